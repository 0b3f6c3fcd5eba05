"""Small lm-eval tasks cut from the shipped prompt sets, for an offline check of the lm-eval path (the
tasks: docs/evaluation.md)."""

from __future__ import annotations

import json
from pathlib import Path

from blt_decode.model import tokenizer
from blt_decode.tools import prompt_sets
TASKS = ("blt_heldout_code_mc", "blt_heldout_code_line", "blt_heldout_bpb")


def _first_line(data: bytes) -> str:
    return tokenizer.display(data).split("\n", 1)[0]


def _write(directory: Path, name: str, rows: list[dict], spec: str) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        f"test_split: test\n{spec}", encoding="utf-8")


def write_heldout_tasks(directory: str | Path, count: int = 16) -> list[str]:
    """Write the three tasks (``count`` documents each, at most the prompt sets' 64) into ``directory``;
    returns their names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    code = prompt_sets.load("heldout-code", min(count + 3, prompt_sets.STORED["heldout-code"]))
    lines = [_first_line(p.reference) for p in code]
    mc, gen = [], []
    for i, p in enumerate(code[:count]):
        distractors = [lines[(i + j) % len(code)] for j in range(1, 4)]
        answer = i % 4
        choices = distractors[:answer] + [lines[i]] + distractors[answer:]
        prompt = tokenizer.display(p.prompt)
        mc.append({"prompt": prompt, "choices": choices, "answer": answer})
        gen.append({"prompt": prompt, "target": lines[i]})
    _write(directory, "blt_heldout_code_mc", mc,
           'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\n'
           'doc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
           "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    _write(directory, "blt_heldout_code_line", gen,
           'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\ntarget_delimiter: ""\n'
           'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 96\n  do_sample: false\n'
           "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    texts = [{"text": tokenizer.display(p.prompt + p.reference)} for p in prompt_sets.load("heldout", count)]
    _write(directory, "blt_heldout_bpb", texts,
           'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
           "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
           "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n")
    return list(TASKS)
