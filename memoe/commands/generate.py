"""``memoe generate EDITED PROMPT [PROMPT ...] [--chat]``: greedy answers of an edited model, through a
plain ``model.generate`` call (the edits apply with no memoe context: drop-in routing).

EDITED is a saved editor folder (``editor.json`` + ``editor.safetensors``: a study's ``adapter/``
artifact or a state folder of its run store), or a study's output folder / its ``results.json``,
whose ``edited_model`` names the final state. ``--chat`` puts each prompt into the instruct model's
chat template. ``--unedited`` answers with the base model for comparison.
"""

from __future__ import annotations

import json
from pathlib import Path


def resolve_edited(path: str | Path) -> Path:
    """The saved-editor folder that ``path`` names (itself, or the ``edited_model`` of a results file)."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "editor.json").is_file():
        return p
    results = p / "results.json" if p.is_dir() else p
    if results.is_file() and results.suffix == ".json":
        data = json.loads(results.read_text())
        state = data.get("edited_model")
        if not state:
            raise FileNotFoundError(
                f"{results}: no 'edited_model' in it (a compare study: use a method's adapter folder)"
            )
        return Path(state)
    raise FileNotFoundError(f"{p}: neither a saved editor folder (editor.json) nor a study's results.json")


def add_arguments(p):
    p.add_argument("edited", help="saved editor folder, or a study's output folder / results.json")
    p.add_argument("prompts", nargs="+", help="prompts to answer")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--unedited", action="store_true", help="also answer with the unedited model")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--device", default="auto")


def answer(model, tok, prompts: list[str], chat: bool, max_new_tokens: int) -> list[str]:
    import torch

    from memoe.probes import chat_prompt

    texts = [chat_prompt(tok, q) or q for q in prompts] if chat else prompts
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(model.device)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = side
    return [t.strip() for t in tok.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)]


def run(args) -> int:
    from memoe.editors import load_edited

    model, tok, editor = load_edited(resolve_edited(args.edited), device=args.device)
    edited = answer(model, tok, args.prompts, args.chat, args.max_new_tokens)
    base = None
    if args.unedited:
        editor.remove()
        base = answer(model, tok, args.prompts, args.chat, args.max_new_tokens)
    for i, (q, a) in enumerate(zip(args.prompts, edited)):
        print(f"> {q}\n  edited:   {a}")
        if base is not None:
            print(f"  unedited: {base[i]}")
    return 0
