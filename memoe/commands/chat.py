"""``memoe chat EDITED``: talk to an edited model in its chat template (one user turn per line; an
empty line or end of input quits). The edits apply in plain ``model.generate`` calls."""

from __future__ import annotations

import sys


def add_arguments(p):
    p.add_argument("edited", help="saved editor folder, or a study's output folder / results.json")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto")


def run(args) -> int:
    import torch

    from memoe.commands.generate import resolve_edited
    from memoe.editors import load_edited

    model, tok, _ = load_edited(resolve_edited(args.edited), device=args.device)
    if not getattr(tok, "chat_template", None):
        print(
            f"error: the tokenizer of {getattr(model, 'memoe_model_name', 'this model')} has no chat template; "
            "use `memoe generate`",
            file=sys.stderr,
        )
        return 2
    turns: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        turns.append({"role": "user", "content": line.strip()})
        ids = tok.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(
            model.device
        )
        with torch.inference_mode():
            out = model.generate(
                **ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        reply = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        turns.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
