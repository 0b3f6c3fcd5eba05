"""docs/training.md's commands run as written, at tiny scale: every bash block marked
``<!-- docs-test -->`` is executed command by command in one directory, with tiny sizes appended
(argparse keeps the last value of an option), ``--device cuda`` run on CPU, ``--compile`` left out (CPU
compilation takes minutes; it has its own test), torchrun on 2 processes over loopback, and a tiny
random model in the original layout standing in for the released ``blt-1b/``."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import attrs

import blt_decode
from blt_decode.checkpoints import formats
from blt_decode.model.config import stack_config
from blt_decode.model.presets import BLT_PRESETS

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"
BLOCK = re.compile(r"<!-- docs-test -->\n```bash\n(.*?)```", re.S)
TINY = ["--steps", "2", "--seq-len", "64", "--batch-size", "4", "--grad-accum", "1", "--warmup-steps", "1",
        "--eval-every", "1000", "--eval-bytes", "256", "--eval-bytes-final", "256", "--checkpoint-every", "1000",
        "--threads", "1", "--no-progress"]


def doc_commands() -> list[list[str]]:
    commands = []
    for block in BLOCK.findall(DOC.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(shlex.split(line))
    return commands


def tiny(command: list[str]) -> list[str]:
    """The documented command at tiny scale (see the module docstring)."""
    args = [a for a in command if a != "--compile"]
    args = ["cpu" if a == "cuda" and prev == "--device" else a for prev, a in zip([""] + args, args)]
    if args[0] == "torchrun":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rest = args[1:]
        rest[rest.index("--nproc_per_node") + 1] = "2"
        args = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port", str(port)] + rest
    elif args[0] == "blt-decode":
        args = [sys.executable, "-m", "blt_decode"] + args[1:]
    head = args[args.index("blt_decode") + 1:] if "blt_decode" in args else []
    if head[:1] == ["train"] and head[1] in ("entropy", "blt", "bytelm"):
        args += TINY + ([] if "--init" in args else ["--preset", "tiny"])
        args += ["--block-sizes", "4", "8"] if head[1] == "blt" else []  # a BLT-D option: refused elsewhere
    if head[:3] == ["corpus", "build", "code"]:
        args += ["--dist", "attrs", "iniconfig", "--max-bytes", "400000"]
    if head[:1] == ["generate"]:
        args += ["--max-new-bytes", "16"]
    return args


def test_docs_have_the_three_paths():
    commands = [" ".join(c) for c in doc_commands()]
    assert any("--init blt-1b" in c for c in commands)  # from a released checkpoint
    assert any("--data corpora/code notes.jsonl" in c for c in commands)  # on your data
    assert any(c.startswith("blt-decode train entropy") for c in commands)  # from scratch
    assert any(c.startswith("torchrun") and "--parallel fsdp" in c for c in commands)  # many processes
    assert any(c.startswith("blt-decode train plot") for c in commands)


def test_docs_commands_run_at_tiny_scale(tmp_path):
    # the stand-ins: a released-layout checkpoint, a code directory, a JSONL file
    config = attrs.evolve(BLT_PRESETS["tiny"], entropy_model=stack_config(32, 1, 2, 512))
    formats.save_checkpoint(blt_decode.random_model(config, 0), tmp_path / "blt-1b", "original")
    (tmp_path / "my_code").mkdir()
    for path in sorted(Path(blt_decode.__file__).parent.glob("*.py"))[:8]:
        (tmp_path / "my_code" / path.name).write_bytes(path.read_bytes()[:5000])
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"text": f"note {i}: " + "words " * 40}) + "\n"
                                                  for i in range(20)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in doc_commands():
        out = subprocess.run(tiny(command), cwd=tmp_path, capture_output=True, text=True, errors="replace",
                             timeout=300, env=env)
        assert out.returncode == 0, (" ".join(command), out.stderr[-3000:])
    assert (tmp_path / "runs" / "blt-d" / "loss.png").is_file()
    for run in ("blt-d", "code", "entropy", "blt", "bytelm", "fsdp"):
        assert (tmp_path / "runs" / run / "final" / "config.json").is_file(), run
    assert blt_decode.load_model(tmp_path / "runs" / "fsdp" / "final").config.patching_threshold == \
        blt_decode.load_model(tmp_path / "blt-1b").config.patching_threshold


def test_train_help_describes_the_three_paths():
    out = subprocess.run([sys.executable, "-m", "blt_decode", "train", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for needle in ("From a released checkpoint", "--init blt-1b", "On your data", "--data", "From scratch",
                   "--entropy-model", "torchrun --nproc_per_node", "--parallel fsdp", "train plot"):
        assert needle in out.stdout, needle


def test_docs_execution_options_are_the_ones_resume_accepts():
    """The options training.md calls execution options (--resume accepts new values) are exactly
    EXECUTION_OPTIONS; --bf16 changes the numerics and is not one of them."""
    from blt_decode.training.config import EXECUTION_OPTIONS

    text = DOC.read_text()
    paragraph = text[text.index("Execution options ("):]
    paragraph = paragraph[: paragraph.index("\n\n")]
    listed = {flag.split("/")[0] for flag in re.findall(r"`(--[a-z0-9-]+(?:/--[a-z0-9-]+)?)", paragraph)} - {"--resume"}
    expected = {"--" + name.removesuffix("_s").replace("_", "-") for name in EXECUTION_OPTIONS - {"out_dir"}}
    assert listed == expected, (listed, expected)
    assert "bf16" not in paragraph


def test_docs_name_modules_that_exist_and_the_heldout_rule_as_coded():
    root = DOC.parents[1]
    text = DOC.read_text()
    for path in set(re.findall(r"`(blt_decode/[\w/]+\.py)`", text)):
        assert (root / path).is_file(), path
    # one document per source is held out only when the source has two or more (data._split)
    from blt_decode.tools.corpus import Document
    from blt_decode.training.data import _split

    one = [Document("d:a", "d", b"x")]
    assert _split(one, 0.5) == (one, [])
    assert "single document" in text and "at least one document per\nsource)" not in text
