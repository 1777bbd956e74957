"""Greedy generation on held-out conversations, rendered with the run's chat template:
exact-match accuracy per task family, and side-by-side samples of the base and tuned model."""

import torch

MARKER = "\u2063ANSWER\u2063"


def split_conversation(messages):
    """(prompt messages, reference answer): everything before the last assistant turn, and
    that turn's content; None when there is no assistant turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        return None
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return prompt, messages[last]["content"]


def stop_token_ids(tokenizer):
    """The eos token and the special token the chat template closes an assistant turn with
    (e.g. ChatML's <|im_end|>), found by rendering a turn rather than by name."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": MARKER}], tokenize=False
    )
    after = tokenizer(text.split(MARKER, 1)[1], add_special_tokens=False)["input_ids"][:1]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return sorted({tokenizer.eos_token_id, *(t for t in after if t in special)} - {None})


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, seed):
    """Greedy completions (stripped text) of chat `prompts` (lists of messages)."""
    tokenizer.padding_side = "left"  # a batch of prompts must end where generation starts
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    stop = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    model.eval()
    completions = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(device)
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        completions += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return completions


def exact_match(prediction, reference):
    return prediction.strip() == reference.strip()
