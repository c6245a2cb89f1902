"""sha256 of every export in a folder: python benchmarks/export_hashes.py FOLDER

Raw bytes for .onnx. For .safetensors also the canonical hash (the header JSON with sorted keys + the data
bytes) and the data bytes' hash: safetensors writes its __metadata__ map in an order that changes from one
process to the next, so two writes of the same tensors and metadata differ in raw bytes (the same commit,
run twice, shows it); the canonical hash is what a byte-identity check compares."""
import hashlib, json, struct, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob("*")):
    if p.suffix not in (".safetensors", ".onnx"):
        continue
    b = p.read_bytes()
    line = f"raw {hashlib.sha256(b).hexdigest()[:16]}"
    if p.suffix == ".safetensors":
        n = struct.unpack("<Q", b[:8])[0]
        header = json.dumps(json.loads(b[8:8 + n]), sort_keys=True).encode()
        line += f"  canonical {hashlib.sha256(header + b[8 + n:]).hexdigest()}  data {hashlib.sha256(b[8 + n:]).hexdigest()[:16]}"
    print(f"{p.name:22s} {line}")
