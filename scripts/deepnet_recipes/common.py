"""Step runner, error handling and shared options of the paper recipes.

A recipe builds :class:`Step` objects (an argv list, optionally stdout to a log file) and hands them to
:class:`Runner`, which

* with ``--dry-run`` prints each command exactly as it would run (``#`` marks steps already done),
* skips a step whose stamp file ``<stamp-dir>/<name>.done`` holds the same command (so a re-run after
  a crash or with the same arguments redoes nothing; a changed command reruns that step),
* runs the rest, and stops at the first failure with the end of its log and a :class:`RecipeError`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

SCRIPTS = Path(__file__).resolve().parent.parent
REPO = SCRIPTS.parent
USER_DIR = REPO / "deepnet_fairseq"

# Exit codes shared by all recipe scripts.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3  # the plugin's --stop-on-divergence-patience exit code, passed through
EXIT_CHECKSUM = 4
EXIT_MISSING_TOOL = 5

CHECKSUMS_ENV = "DEEPNET_RECIPE_CHECKSUMS"


class RecipeError(Exception):
    """A clear, user-facing failure; ``code`` becomes the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def tool_env() -> Dict[str, str]:
    """Environment under which ``python -m deepnet_recipes.tools`` resolves."""
    path = os.environ.get("PYTHONPATH", "")
    parts = [str(SCRIPTS)] + [p for p in path.split(os.pathsep) if p and p != str(SCRIPTS)]
    return {"PYTHONPATH": os.pathsep.join(parts)}


def python_tool(*args: object) -> List[str]:
    """argv of one ``deepnet_recipes.tools`` subcommand, run by this interpreter."""
    return [sys.executable, "-m", "deepnet_recipes.tools", *map(str, args)]


@dataclass
class Step:
    name: str  # unique within a recipe; names the stamp file
    argv: List[str]
    log: Optional[Path] = None  # stdout+stderr go here (else to the terminal); stderr only when stdout is set
    stdout: Optional[Path] = None  # stdout alone goes here
    append: bool = False  # append to log instead of overwriting (training resumes)
    key_extra: str = ""  # extra text for the stamp key (e.g. checkpoint mtimes)
    env: Dict[str, str] = field(default_factory=dict)
    always: bool = False  # never stamped (cheap checks)
    ok_codes: Sequence[int] = (0,)

    def render(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = " ".join(shlex.quote(str(a)) for a in self.argv)
        if self.stdout is not None:
            cmd += f" > {shlex.quote(str(self.stdout))}"
            if self.log is not None:
                cmd += f" 2> {shlex.quote(str(self.log))}"
        elif self.log is not None:
            cmd += f" {'>>' if self.append else '>'} {shlex.quote(str(self.log))} 2>&1"
        return f"{env} {cmd}".strip()


class Runner:
    def __init__(self, stamp_dir: Path, dry_run: bool, prog: str):
        self.stamp_dir = stamp_dir
        self.dry_run = dry_run
        self.prog = prog
        self.dirty = False  # once a step runs, every later step reruns too (its inputs changed)

    def stamp(self, step: Step) -> Path:
        return self.stamp_dir / f"{step.name}.done"

    def key(self, step: Step) -> str:
        return hashlib.sha256((step.render() + "\n" + step.key_extra).encode()).hexdigest()

    def is_done(self, step: Step) -> bool:
        stamp = self.stamp(step)
        return (not self.dirty and not step.always and stamp.exists()
                and stamp.read_text().strip() == self.key(step))

    def run(self, step: Step) -> int:
        done = self.is_done(step)
        if self.dry_run:
            print(("# done: " if done else "") + step.render())
            return 0
        if done:
            print(f"[{self.prog}] skip {step.name} (done; stamp {self.stamp(step)})", flush=True)
            return 0
        print(f"[{self.prog}] {step.name}: {step.render()}", flush=True)
        env = dict(os.environ, **step.env)
        argv = [str(a) for a in step.argv]
        if not step.always:
            self.dirty = True
            self.stamp(step).unlink(missing_ok=True)
        if step.stdout is not None:
            step.stdout.parent.mkdir(parents=True, exist_ok=True)
            with open(step.stdout, "w", encoding="utf-8") as out:
                if step.log is not None:
                    with open(step.log, "w", encoding="utf-8") as err:
                        code = subprocess.call(argv, stdout=out, stderr=err, env=env)
                else:
                    code = subprocess.call(argv, stdout=out, env=env)
        elif step.log is not None:
            step.log.parent.mkdir(parents=True, exist_ok=True)
            with open(step.log, "a" if step.append else "w", encoding="utf-8") as handle:
                code = subprocess.call(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)
        else:
            code = subprocess.call(argv, env=env)
        if code not in step.ok_codes:
            tail = ""
            if step.log is not None and step.log.exists():
                tail = "\n".join(step.log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
                tail = f"\n--- last lines of {step.log} ---\n{tail}"
            raise RecipeError(f"step {step.name} failed with exit code {code}: {step.render()}{tail}", code)
        if not step.always:
            self.stamp_dir.mkdir(parents=True, exist_ok=True)
            self.stamp(step).write_text(self.key(step) + "\n")
        return code

    def run_all(self, steps: Iterable[Step]) -> None:
        for step in steps:
            self.run(step)


def require_tools(names: Iterable[str], modules: Iterable[str] = ()) -> None:
    """Refuse to start when a console script or Python module the recipe calls is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(f"python module {module!r}")
    if missing:
        raise RecipeError(
            "missing tools: " + ", ".join(missing) + " (activate the project's venv, e.g. `. .venv/bin/activate`, "
            "or run `make setup`; sacremoses comes from requirements.txt)",
            EXIT_MISSING_TOOL,
        )


def checksums_file(default: Path, given: Optional[Path]) -> Path:
    """--checksums FILE, else $DEEPNET_RECIPE_CHECKSUMS, else the recipe's own checksums.sha256."""
    if given is not None:
        return given
    env = os.environ.get(CHECKSUMS_ENV)
    return Path(env) if env else default


def recipe_parser(prog: str, doc: Optional[str]) -> argparse.ArgumentParser:
    """The argument parser of one recipe action (``prog`` = the wrapper script, ``doc`` = the recipe's docstring)."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def start_prepare(argv: Optional[Sequence[str]], doc: Optional[str], default_out: Path, checksums: Path,
                  modules: Iterable[str], add_options: Callable[[argparse.ArgumentParser], None]
                  ) -> Tuple[argparse.Namespace, Path]:
    """prepare.sh's command line: ``--out-dir``, the recipe's options (``add_options``, which must add
    ``--vocab-size``), the download and common options. Checks ``--vocab-size``/``--workers``/``--data-dir``
    and, unless ``--dry-run``, the tools prepare.sh calls; returns (args, the resolved ``--out-dir``, created)."""
    parser = recipe_parser("prepare.sh", doc)
    parser.add_argument("--out-dir", type=Path, default=default_out, help=f"default {default_out}")
    add_options(parser)
    add_download_args(parser, checksums)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.vocab_size < 100 or args.workers < 1:
        parser.error("--vocab-size must be >= 100 and --workers >= 1")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir}: not a directory")
    out = args.out_dir.resolve()
    if not args.dry_run:
        require_tools(["fairseq-preprocess", "tar"], modules)
        out.mkdir(parents=True, exist_ok=True)
    return args, out


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the exact commands and exit")


def add_download_args(parser: argparse.ArgumentParser, checksums: Path) -> None:
    parser.add_argument("--data-dir", type=Path, help="use the archives already in DIR instead of downloading")
    parser.add_argument("--mirror", help="download from this base URL instead (e.g. file:///data/mirror)")
    parser.add_argument("--checksums", type=Path,
                        help=f"sha256 list to verify archives against (default ${CHECKSUMS_ENV}, else {checksums})")
    parser.add_argument("--require-checksums", action="store_true",
                        help="refuse archives with no recorded checksum (default: warn and print the sha256)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="processes for tokenization and fairseq-preprocess")


def fetch_step(name: str, url: str, raw_dir: Path, args: argparse.Namespace, default_checksums: Path) -> Step:
    argv = python_tool("fetch", "--name", name, "--url", url, "--out", raw_dir / name,
                       "--checksums", checksums_file(default_checksums, args.checksums))
    if args.data_dir is not None:
        argv += ["--data-dir", args.data_dir.resolve()]
    if args.mirror:
        argv += ["--mirror", args.mirror]
    if args.require_checksums:
        argv += ["--require-checksums"]
    return Step(f"fetch-{name}", argv, env=tool_env())


def main_wrapper(prog: str, func, argv: Optional[Sequence[str]] = None) -> int:
    try:
        return func(argv) or 0
    except RecipeError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130


def check_positive(parser: argparse.ArgumentParser, **values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            parser.error(f"{name} must be a positive integer, got {value}")


def cli(module_doc: str, actions: dict, argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in actions:
        print(f"usage: python -m MODULE {{{','.join(actions)}}} ...\n\n{module_doc}", file=sys.stderr)
        return EXIT_USAGE
    action = argv.pop(0)
    return main_wrapper(f"{action}.sh", actions[action], argv)
