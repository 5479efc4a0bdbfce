"""Benchmark 2: one GRPO step of ``fmr1lib.grpo`` against TRL's ``GRPOTrainer``, and the cost
of the faithful reward.

All runs start from the same tiny backbone after a short SFT (``common.sft_model``: the faithful
reward scores answer-correct trajectories only, so a random model would never run it), on the
same 64 FocusShapes prompts, with the same settings: P = 4 prompts x G = 8 samples, at most 32
new tokens, temperature 1, top-p 1, top-k 50 (transformers' default, which ``fmr1lib`` sampling
inherits), vision tokens suppressed, AdamW lr 5e-4, constant schedule, clip 0.2 / 0.28,
token-mean loss, group std normalisation, no KL, one policy update per rollout, gradient-norm
clip 1, no gradient checkpointing; reward = accuracy + 0.5 * format.

Variants, each training its own copy of the model:

* ``trl``: ``trl.GRPOTrainer`` (vision-language path: conversational prompts, an ``image``
  column, our processor with ``<Focus>`` appended to the generation prompt so the prompts are
  token for token ours). Its steps drive the loop: after each TRL step a callback runs one
  round of our variants, so all are interleaved;
* ``grpo``: ``fmr1lib.grpo.grpo_step`` with accuracy + format;
* ``faithful`` / ``faithful_occlusion``: + the faithful reward (causal region from the evidence
  boxes / from the occlusion search, ``coarse_to_fine`` by default; ``_exhaustive``,
  ``_gradient`` and ``_budgeted`` name the other searches), with ``faithful_form`` ``group_tanh`` (default; the
  counterfactual pass runs only for groups with >= 2 distinct correct completions) and ``raw``
  (it runs for every group with a correct completion).

    python bench/grpo_step.py               # about 1-2 min on 2 cores
    python bench/grpo_step.py --repeats 4
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import traceback
import warnings
from typing import Any

# common first: it silences tqdm, which torch imports.
try:
    from bench import common
except ImportError:  # run as a script: bench/ itself is on sys.path
    import common  # type: ignore[no-redef]

import torch

from fmr1lib import grpo, modeling, prompting, rewards

OURS = {
    # name: (variant, faithful_form, occlusion_search; None: the RLParams default, coarse_to_fine)
    "grpo": ("grpo", "group_tanh", None),
    "faithful": ("faithful", "group_tanh", None),
    "faithful_occlusion": ("faithful_occlusion", "group_tanh", None),
    "faithful_occlusion_exhaustive": ("faithful_occlusion", "group_tanh", "exhaustive"),
    "faithful_occlusion_gradient": ("faithful_occlusion", "group_tanh", "gradient"),
    "faithful_occlusion_budgeted": ("faithful_occlusion", "group_tanh", "budgeted"),
    "faithful_raw": ("faithful", "raw", None),
    "faithful_occlusion_raw": ("faithful_occlusion", "raw", None),
    "faithful_occlusion_exhaustive_raw": ("faithful_occlusion", "raw", "exhaustive"),
}
SETTINGS = {"prompts_per_step": 4, "group_size": 8, "max_new_tokens": 32, "lr": 5e-4,
            "temperature": 1.0, "top_p": 1.0, "top_k": 50, "clip_low": 0.2, "clip_high": 0.28,
            "w_acc": 1.0, "w_fmt": 0.5, "n_prompts": 64}


def _focus_processor(processor: Any) -> Any:
    """A shallow copy of ``processor`` whose generation prompt ends with ``<Focus>``, as ours."""
    proc = copy.copy(processor)
    marker = "<|im_start|>assistant\n{% endif %}"
    if marker not in modeling.CHAT_TEMPLATE:
        raise RuntimeError("the chat template changed: update the <Focus> insertion")
    proc.chat_template = modeling.CHAT_TEMPLATE.replace(
        marker, "<|im_start|>assistant\n" + prompting.FOCUS + "{% endif %}")
    return proc


def _trl_dataset(rows: list[dict[str, Any]]) -> Any:
    """TRL's vision-language format: conversational ``prompt`` plus an ``image`` column."""
    from datasets import Dataset

    def prompt(question: str) -> list[dict[str, Any]]:
        return [{"role": "system", "content": [{"type": "text", "text": prompting.SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    return Dataset.from_list([{"prompt": prompt(r["question"]), "image": r["image"],
                               "answer": r["answer"], "answer_type": r["answer_type"]}
                              for r in rows])


def _trl_rewards(processor: Any, seen: dict[str, list[float]]) -> list[Any]:
    """Accuracy and format rewards for TRL, decoded from the token ids with the tags kept.

    TRL decodes completions with ``skip_special_tokens=True``, which drops our tag tokens
    (``<think>``, ``<answer>`` are special tokens of the tiny tokenizer); the token ids it also
    passes give the same text ``fmr1lib`` scores.
    """
    def texts(completion_ids: list[list[int]]) -> list[str]:
        width = max(1, max(len(c) for c in completion_ids))
        pad = processor.tokenizer.pad_token_id
        ids = torch.tensor([c + [pad] * (width - len(c)) for c in completion_ids])
        return modeling.decode_completions(processor, ids)

    def accuracy(completions: Any, completion_ids: list[list[int]], answer: list[str],
                 answer_type: list[str], **_: Any) -> list[float]:
        scores = rewards.accuracy_reward(texts(completion_ids), answer, answer_type)
        seen["accuracy"] += scores
        seen["length"] += [float(len(c)) for c in completion_ids]
        return scores

    def format_(completions: Any, completion_ids: list[list[int]], **_: Any) -> list[float]:
        return rewards.format_reward(texts(completion_ids))

    format_.__name__ = "format"
    return [accuracy, format_]


def _run_trl(model: Any, processor: Any, rows: list[dict[str, Any]], rounds: int,
             between_steps: Any, out_dir: str) -> tuple[list[float], dict[str, list[float]]]:
    """Train TRL for ``rounds`` steps, calling ``between_steps()`` after each; its step times."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    seen: dict[str, list[float]] = {"accuracy": [], "length": []}
    times: list[float] = []

    class Interleave(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            common.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            common.synchronize()
            times.append(time.perf_counter() - self.t0)
            between_steps()

    s = SETTINGS
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=s["prompts_per_step"] * s["group_size"],
        num_generations=s["group_size"], max_completion_length=s["max_new_tokens"],
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, epsilon=s["clip_low"], epsilon_high=s["clip_high"],
        loss_type="dapo", scale_rewards="group", num_iterations=1, temperature=s["temperature"],
        top_p=s["top_p"], top_k=s["top_k"], gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(), bf16=False, max_steps=rounds, logging_steps=10**6,
        save_strategy="no", report_to="none", reward_weights=[s["w_acc"], s["w_fmt"]],
        generation_kwargs={"suppress_tokens": modeling.vision_token_ids(processor)},
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_trl_rewards(processor, seen),
                          args=args, train_dataset=_trl_dataset(rows),
                          processing_class=_focus_processor(processor), callbacks=[Interleave()])
    trainer.remove_callback(PrinterCallback)  # it prints the run summary over our table
    trainer.train()
    return times, seen


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the variants, print the tables, write ``runs/bench/grpo_step.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL")
    args = parser.parse_args(argv)
    common.setup(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    model, processor = common.sft_model()
    rows = common.make_rows(SETTINGS["n_prompts"])
    rl = {k: SETTINGS[k] for k in ("prompts_per_step", "group_size", "max_new_tokens", "lr",
                                   "temperature", "top_p", "clip_low", "clip_high", "w_acc",
                                   "w_fmt")}
    contexts = {name: common.grpo_context(model, processor, variant, faithful_form=form, **rl,
                                          **({"occlusion_search": how} if how else {}))
                for name, (variant, form, how) in OURS.items()}
    rounds = 1 + args.repeats  # the first round warms up and is dropped
    times: dict[str, list[float]] = {n: [] for n in OURS}
    stats: dict[str, list[dict[str, Any]]] = {n: [] for n in OURS}
    state = {"round": 0}

    def our_round() -> None:
        r = state["round"]
        names = list(OURS)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            dt, (st, _) = common.timed(lambda c=contexts[name], r=r: grpo.grpo_step(c, rows, r))
            if r > 0:
                times[name].append(dt)
                stats[name].append(st)
        state["round"] += 1

    trl: dict[str, Any] = {"ran": False}
    if args.no_trl:
        trl["reason"] = "skipped (--no-trl)"
    else:
        try:
            import trl as trl_pkg

            trl["version"] = trl_pkg.__version__
        except ImportError:
            trl["reason"] = "trl is not installed (pip install -e '.[bench]')"
    if "reason" not in trl:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                trl_times, seen = _run_trl(model, processor, rows, rounds, our_round, tmp)
            trl.update(ran=True, times_s=trl_times[1:], accuracy=_mean(seen["accuracy"]),
                       completion_len=_mean(seen["length"]))
        except Exception as exc:  # report why TRL could not run, never a made-up number
            trl["reason"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            trl["traceback"] = traceback.format_exc()[-3000:]
    while state["round"] < rounds:  # TRL skipped or failed: our variants alone
        our_round()

    med = {n: common.median(t) for n, t in times.items()}
    trl_med = common.median(trl.get("times_s", []))
    variants: dict[str, Any] = {}
    for name in OURS:
        st = stats[name]
        variants[name] = {
            "median_s": med[name], "times_s": times[name], "over_grpo": med[name] / med["grpo"],
            "over_trl": med[name] / trl_med if trl["ran"] else None,
            "completion_len": _mean([s["completion_len"] for s in st]),
            "accuracy": _mean([s["accuracy"] for s in st]),
            "faithful_s": common.median([s["faithful_s"] for s in st]),
            # Measured inside each step, so not blurred by step-to-step differences in length.
            "faithful_share": common.median([s["faithful_s"] / s["step_s"] for s in st]),
            "faithful_passes": _mean([float(s["n_faithful_distinct"]) for s in st]),
            "rollout_s": common.median([s["rollout_s"] for s in st])}
    rows_out = []
    if trl["ran"]:
        rows_out.append(["trl GRPOTrainer", trl_med, trl_med / med["grpo"], 1.0,
                         trl["completion_len"], trl["accuracy"], "-", "-"])
    else:
        rows_out.append(["trl GRPOTrainer", f"not run: {trl['reason']}", "-", "-", "-", "-", "-",
                         "-"])
    for name, v in variants.items():
        rows_out.append([f"fmr1 {name}", v["median_s"], v["over_grpo"], v["over_trl"],
                         v["completion_len"], v["accuracy"], v["faithful_passes"],
                         v["faithful_share"]])
    title = (f"One GRPO step (P=4 x G=8, <= 32 new tokens, tiny backbone after SFT) on "
             f"{common.device_name()}; median of {args.repeats} interleaved steps")
    text = common.table(title, ["variant", "step s", "/ fmr1 grpo", "/ trl", "mean len",
                                "accuracy", "faithful passes", "faithful share"], rows_out)
    print(text)
    wall = time.perf_counter() - t0
    summary = {"grpo_over_trl": med["grpo"] / trl_med if trl["ran"] else None,
               **{f"{n}_over_grpo": variants[n]["over_grpo"] for n in OURS if n != "grpo"}}
    print("\n" + "; ".join(f"{k} = {common.fmt(v)}" for k, v in summary.items()))
    path = common.write_json("grpo_step", {"settings": SETTINGS, "repeats": args.repeats,
                                           "trl": trl, "variants": variants,
                                           "summary": summary, "table": text, "wall_s": wall})
    print(f"\n{wall:.0f} s; wrote {path}")
    return {"summary": summary}


def _mean(xs: list[float]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(sum(vals) / len(vals)) if vals else None


if __name__ == "__main__":
    main()
