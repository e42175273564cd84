"""``memoe demo [CONFIG] [--set k=v] [--n 5]``: edit a handful of records with MEMoE on the configured
model (default: the first 5 ZsRE edits on the embedded SmolLM2-135M) and print, per edit, the greedy
answer before and after the edit, on a rephrase, and on an unrelated (locality) prompt."""

from __future__ import annotations

import time


def add_arguments(p):
    from memoe.commands import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--n", type=int, default=5, help="number of edits (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=12)


def run(args) -> int:
    import torch

    from memoe.config import load_config
    from memoe.datasets import load_for_config
    from memoe.editors.memoe import MEMoEMethod
    from memoe.editors.memoe.editor import MEMoEEditor
    from memoe.metrics import generate
    from memoe.models import context_length, load_model

    cfg = load_config(args.config, [*args.set, f"data.n_edits={args.n}"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    method = cfg.method if isinstance(cfg.method, MEMoEMethod) else MEMoEMethod()
    model, tok = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    recs, _ = load_for_config(cfg, tok, context_length(model, tok))
    rows = list(recs.iter_rows(named=True))
    first = lambda xs: (xs or [None])[0]  # noqa: E731
    reph = [first(r["rephrase_prompts"]) for r in rows]
    loc = [first(r["locality_prompts"]) for r in rows]
    prompts = [r["prompt"] for r in rows]

    def gen(ps, ed=None):
        return generate(model, tok, [p or "" for p in ps], editor=ed, max_new_tokens=args.max_new_tokens)

    before, loc_before = gen(prompts), gen(loc)
    editor = MEMoEEditor(model, tok, method, seed=cfg.seed)
    t0 = time.perf_counter()
    stats = editor.edit(recs)
    dt = time.perf_counter() - t0
    after, reph_after, loc_after = gen(prompts, editor), gen(reph, editor), gen(loc, editor)
    print(
        f"MEMoE on {cfg.model.name}: {len(rows)} edits in {dt:.1f}s "
        f"({stats.steps} steps, final loss {stats.loss_final:.4f}, layers {method.layers}, "
        f"gate {method.gate_mode})\n"
    )
    for i, r in enumerate(rows):
        print(f"[{i + 1}] {r['prompt']}")
        print(f"    subject {r['subject']!r}: {r['target_true']!r} -> {r['target_new']!r}")
        print(f"    before:    {before[i]!r}")
        print(f"    after:     {after[i]!r}")
        if reph[i]:
            a = editor.extractor(reph[i])
            print(f"    rephrase:  {reph[i]}\n               -> {reph_after[i]!r}   (anchor {a.text!r})")
        if loc[i]:
            same = "unchanged" if loc_after[i] == loc_before[i] else f"CHANGED from {loc_before[i]!r}"
            print(f"    unrelated: {loc[i]}\n               -> {loc_after[i]!r}   ({same})")
        print()
    editor.remove()
    return 0
