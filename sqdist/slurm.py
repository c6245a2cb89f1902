"""Submit sqdist training to Slurm: one ``accelerate launch`` per node.

    python -m sqdist.slurm submit recipes/digits_sq_twn.yaml train.epochs=2 \\
        --nodes 2 --gpus-per-node 8 [--cpus-per-node 64 --partition P --time 1-00:00:00
        --account A --sbatch=--qos=high] [--dry-run]

renders ``slurm/train.sbatch``, submits it with ``sbatch`` and prints the job id
and the log path (``--dry-run`` prints the script instead). The job:

- runs ``srun`` with one task per node; each task runs ``accelerate launch``
  with ``--machine_rank $SLURM_NODEID``, ``--num_machines N``,
  ``--num_processes N*G``, the first node of the allocation as main process and
  a port derived from the job id;
- runs ``-m sqdist.train RECIPE overrides... train.resume=auto`` with the Python
  this command runs under, so the nodes use the same environment;
- on CPU nodes (``--gpus-per-node 0``) starts one process per node; training
  then uses ``Accelerator(cpu=True)`` and gloo;
- is requeueable and asks for SIGUSR1 before its time limit (see
  :mod:`sqdist.train.preempt`); the requeued run resumes from the last checkpoint
  and appends to the same log.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch"
# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_RE = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


class SubmitError(ValueError):
    """Bad submit input; the message is one line for the user."""


@dataclass(frozen=True)
class SubmitSpec:
    """What to run where. Paths are made absolute by :func:`render`.

    ``gpus_per_node=0`` means CPU nodes with one training process each.
    ``cpus_per_node``: CPUs for the node's launcher and all its processes
    (Slurm's default is one). ``sbatch_options``: extra ``#SBATCH`` options
    such as ``--qos=high`` or ``--mem=0``.
    ``signal_seconds``: how long before the time limit Slurm sends SIGUSR1
    (Slurm may send it up to a minute earlier than asked).
    """

    recipe: Path
    overrides: tuple[str, ...] = ()
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    sbatch_options: tuple[str, ...] = ()
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str | None = None
    log_dir: Path = Path("runs/slurm-logs")
    workdir: Path = field(default_factory=Path.cwd)
    signal_seconds: int = 300
    python: str = sys.executable
    module: str = "sqdist.train"
    template: Path = TEMPLATE

    @property
    def name(self) -> str:
        return self.job_name or f"sqdist-{Path(self.recipe).stem}"

    @property
    def processes_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def num_processes(self) -> int:
        return self.nodes * self.processes_per_node

    def log_path(self, job_id: str | int = "%j") -> Path:
        """The job's log file; ``%j`` (Slurm's pattern) until the id is known."""
        return self._abs(self.log_dir) / f"{self.name}-{job_id}.log"

    def _abs(self, path: Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else Path(self.workdir) / path


def time_to_seconds(value: str) -> int:
    """Slurm ``--time`` string -> seconds ("90" -> 5400, "1-02:00:00" -> 93600)."""
    m = _TIME_RE.match(value)
    if not m:
        raise SubmitError(
            f"--time={value!r} is not a Slurm time limit: use MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN or D-H:MIN:SEC"
        )
    d, dh, dm, ds, mm, ms, hs = m.groups()
    if d is not None:
        return int(d) * 86400 + int(dh) * 3600 + int(dm or 0) * 60 + int(ds or 0)
    if hs is not None:  # H:M:S
        return int(mm) * 3600 + int(ms) * 60 + int(hs)
    return int(mm) * 60 + int(ms or 0)


def validate(spec: SubmitSpec) -> None:
    """Raise :class:`SubmitError` naming the bad value and what is allowed."""
    recipe = spec._abs(spec.recipe)
    if not recipe.is_file():
        raise SubmitError(f"recipe {str(spec.recipe)!r} is not a file (looked at {recipe})")
    if recipe.suffix not in (".yaml", ".yml"):
        raise SubmitError(f"recipe {str(spec.recipe)!r} must be a .yaml or .yml file")
    if spec.nodes < 1:
        raise SubmitError(f"--nodes={spec.nodes}: must be at least 1")
    if spec.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node={spec.gpus_per_node}: must be 0 (CPU nodes) or more")
    if spec.cpus_per_node is not None and spec.cpus_per_node < 1:
        raise SubmitError(f"--cpus-per-node={spec.cpus_per_node}: must be at least 1")
    for opt in spec.sbatch_options:
        if not re.match(r"^--[a-z][a-z-]*(=\S+)?$", opt):
            raise SubmitError(f"--sbatch={opt!r}: give one sbatch option as --name or --name=value")
    if not 1 <= spec.signal_seconds <= 65535:
        raise SubmitError(f"--signal-before={spec.signal_seconds}: must be 1..65535 seconds (Slurm's limit)")
    if spec.time is not None:
        limit = time_to_seconds(spec.time)
        if limit <= spec.signal_seconds:
            raise SubmitError(
                f"--time={spec.time} ({limit} s) must be longer than --signal-before={spec.signal_seconds} s, "
                "or the preemption warning comes at the start"
            )
    for opt, value in (("--partition", spec.partition), ("--account", spec.account), ("--job-name", spec.job_name)):
        if value is not None and not _NAME_RE.match(value):
            raise SubmitError(f"{opt}={value!r}: use letters, digits and _ . + - only")
    for what, path in (("working directory", spec.workdir), ("--log-dir", spec._abs(spec.log_dir))):
        if re.search(r"\s", str(path)):
            raise SubmitError(f"{what} {str(path)!r} contains whitespace, which #SBATCH lines cannot carry")
    for item in spec.overrides:
        key, sep, _ = item.partition("=")
        if not sep or not _KEY_RE.match(key):
            raise SubmitError(f"override {item!r} is not key=value with a dotted key (e.g. train.epochs=2)")
        if key == "train.resume":
            raise SubmitError(f"override {item!r}: the Slurm job sets train.resume=auto itself, so requeues resume")


def render(spec: SubmitSpec) -> str:
    """The sbatch script for ``spec`` (validated first)."""
    validate(spec)
    resources = []
    if spec.gpus_per_node:
        resources.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_node:
        resources.append(f"#SBATCH --cpus-per-task={spec.cpus_per_node}")
    for opt, value in (("partition", spec.partition), ("time", spec.time), ("account", spec.account)):
        if value is not None:
            resources.append(f"#SBATCH --{opt}={value}")
    resources += [f"#SBATCH {opt}" for opt in spec.sbatch_options]
    launch = [
        "--num_machines", str(spec.nodes),
        "--num_processes", str(spec.num_processes),
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
    ]
    if spec.num_processes > 1:
        # torch.distributed.run starts the processes; on CPU nodes training
        # picks gloo via Accelerator(cpu=True).
        launch.insert(0, "--multi_gpu")
    train = [str(spec._abs(spec.recipe)), *spec.overrides, "train.resume=auto"]
    values = {
        "job_name": spec.name,
        "nodes": str(spec.nodes),
        # srun does not inherit --cpus-per-task from sbatch in Slurm 22.05-23.02.
        "srun_cpus": f" --cpus-per-task={spec.cpus_per_node}" if spec.cpus_per_node else "",
        "resource_lines": "\n".join(resources),
        "workdir": str(Path(spec.workdir).resolve()),
        "log": str(spec.log_path()),
        "requeue_file": shlex.quote(str(spec._abs(spec.log_dir) / spec.name)) + '-"$SLURM_JOB_ID".requeue',
        "signal_seconds": str(spec.signal_seconds),
        "python": shlex.quote(spec.python),
        "launch_args": shlex.join(launch),
        "module": shlex.quote(spec.module),
        "train_args": shlex.join(train),
    }
    text = Path(spec.template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        missing = re.findall(r"\{\{(\w+)\}\}", text)
        raise SubmitError(f"template {spec.template} has unknown placeholders {missing}")
    return text.replace("\n\n#SBATCH --chdir", "\n#SBATCH --chdir")  # no blank line without resources


def submit(spec: SubmitSpec) -> tuple[str, Path]:
    """Render and ``sbatch`` the job. Returns (job id, log path).

    The rendered script is also saved next to the log as ``<name>-<id>.sbatch``.
    """
    script = render(spec)
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found on PATH: run on a Slurm login node (or start one: bash slurm/cluster_up.sh)")
    # Slurm does not create the log folder; a missing one makes the job fail silently.
    spec._abs(spec.log_dir).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    log = spec.log_path(job_id)
    log.with_suffix(".sbatch").write_text(script)
    return job_id, log


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sqdist.slurm", description="Run sqdist training on Slurm.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="render the sbatch script and submit it")
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value (e.g. train.epochs=2)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="processes per node; 0 = CPU nodes, 1 process each")
    p.add_argument("--cpus-per-node", type=int, help="CPUs for each node's processes (Slurm's default: 1)")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, Slurm format (e.g. 4:00:00)")
    p.add_argument("--account")
    p.add_argument("--job-name", help="default sqdist-<recipe stem>")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, e.g. --sbatch=--qos=high (repeatable)")
    p.add_argument("--log-dir", type=Path, default=Path("runs/slurm-logs"))
    p.add_argument("--signal-before", type=int, default=300, metavar="SECS",
                   help="send SIGUSR1 this long before the time limit (default 300)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    spec = SubmitSpec(
        recipe=args.recipe, overrides=tuple(args.overrides), nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
        sbatch_options=tuple(args.sbatch), partition=args.partition, time=args.time,
        account=args.account, job_name=args.job_name, log_dir=args.log_dir,
        signal_seconds=args.signal_before,
    )
    try:
        if args.dry_run:
            sys.stdout.write(render(spec))
            return 0
        job_id, log = submit(spec)
    except SubmitError as err:
        print(f"sqdist.slurm: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"sqdist.slurm: error: {err}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}")
    print(f"log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
