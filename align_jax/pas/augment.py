"""Inference-time prompt augmentation with a trained PAS model.

    aug = Augmenter.load("runs/pas-sft")                # the PAS model's SFT workdir (or an HF dir)
    aug.augment(["What is 2 plus 3?"])                  # -> ["What is 2 plus 3?\n\nGive the final result ..."]
    aug.augment_messages([{"role": "user", "content": "..."}])     # last user turn augmented
    register_grpo_augmenter("pas", aug)                 # then config.augment = "pas"

The PAS model sees exactly its training chat (templates.pas_messages: PAS_SYSTEM + the prompt) and
writes a complement, which is joined to the prompt by `template` ("{prompt}\n\n{complement}" by
default). An empty complement leaves the prompt unchanged. Only the last user turn is augmented (its
text alone is what the PAS model sees); earlier turns and the system prompt are kept as they are.

Greedy complements (temperature 0, the default) are cached by prompt text, so a prompt seen again
(GRPO revisits its prompts every epoch and calls the hook one row at a time) costs nothing;
`complements(all_prompts)` ahead of time fills the cache in full batches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from align_jax.pas import templates

if TYPE_CHECKING:  # jax loads with the model, not with this module
    from align_jax.sharding import Sharder

DEFAULT_TEMPLATE = "{prompt}\n\n{complement}"


class Augmenter:
    def __init__(
        self,
        pas_model: Any,
        *,
        max_new_tokens: int = 64,
        template: str = DEFAULT_TEMPLATE,
        system: str = templates.PAS_SYSTEM,
        temperature: float = 0.0,
        seed: int = 0,
        batch: int = 64,
        cache_size: int = 100_000,
    ):
        if "{prompt}" not in template or "{complement}" not in template:
            raise ValueError(f"Augmenter template {template!r} needs both {{prompt}} and {{complement}}")
        self.model, self.max_new_tokens, self.template, self.system = pas_model, max_new_tokens, template, system
        self.temperature, self.seed, self.batch = temperature, seed, batch
        self.cache_size = cache_size if temperature == 0 else 0  # sampled complements are not reusable
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._calls = 0

    @classmethod
    def load(
        cls,
        pas_workdir: str,
        *,
        step: int | None = None,
        batch_size: int = 16,
        dtype: str = "float32",
        sharder: Sharder | None = None,
        **kwargs: Any,
    ) -> Augmenter:
        """An Augmenter over the ChatModel in `pas_workdir` (an SFT stage workdir or an HF directory), its
        params sharded over `sharder`'s mesh (default: ChatModel's, every local device on fsdp)."""
        from align_jax import checkpoint
        from align_jax.chat import ChatModel

        if "max_new_tokens" not in kwargs and not checkpoint.is_hf_dir(pas_workdir):
            # A pas stage's workdir: complements as long as the ones it was trained on.
            saved = checkpoint.read_config(pas_workdir, step).get("config", {})
            if saved.get("stage") == "pas":
                kwargs["max_new_tokens"] = int(saved["max_new_tokens"])
        model = ChatModel.load(pas_workdir, step=step, batch_size=batch_size, dtype=dtype, sharder=sharder)
        return cls(model, **kwargs)

    def complements(self, prompts: Sequence[str]) -> list[str]:
        """The PAS model's complement for each prompt (stripped; "" when it writes nothing)."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh: dict[str, str] = {}
        for lo in range(0, len(todo), self.batch):
            part = todo[lo : lo + self.batch]
            chats = [templates.pas_messages(p, self.system) for p in part]
            replies = self.model.generate(
                chats, max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed + self._calls
            )
            self._calls += 1
            if len(replies) != len(part):
                raise ValueError(f"PAS model returned {len(replies)} replies for {len(part)} prompts")
            fresh.update(zip(part, (r.strip() for r in replies), strict=True))
        out = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        if self.cache_size:
            for p, c in fresh.items():
                self._cache[p] = c
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def join(self, prompt: str, complement: str) -> str:
        return self.template.format(prompt=prompt, complement=complement) if complement else prompt

    def augment(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt with its complement joined by the template."""
        return [self.join(p, c) for p, c in zip(prompts, self.complements(prompts), strict=True)]

    def augment_conversations(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[dict]]:
        """Copies of the conversations with the last user turn of each augmented (one batched PAS call);
        a conversation without a user turn comes back unchanged."""
        copies = [[dict(m) for m in conv] for conv in conversations]
        where = []
        for c, conv in enumerate(copies):
            users = [k for k, m in enumerate(conv) if m.get("role") == "user"]
            if users:
                where.append((c, users[-1]))
        texts = [copies[c][k]["content"] for c, k in where]
        for (c, k), new in zip(where, self.augment(texts), strict=True):
            copies[c][k]["content"] = new
        return copies

    def augment_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict]:
        """One conversation with its last user turn augmented."""
        return self.augment_conversations([messages])[0]


# Prompt augmentation before GRPO samples: name -> fn(prompt messages, row) -> prompt messages, optionally
# with a `batch(list of messages, rows) -> list of messages` attribute for one call per rollout. "none"
# leaves prompts as they are; `pas:WORKDIR` (see `augmenter`) loads a trained pas stage's model.
AUGMENTERS: dict[str, Callable[[list[dict], Mapping[str, Any]], list[dict]]] = {"none": lambda prompt, row: prompt}


def register_grpo_augmenter(name: str, augmenter: Augmenter | str, *, replace: bool = False) -> None:
    """Adds `name` to AUGMENTERS, so a GRPO run with config.augment = name samples responses to the
    augmented prompts. `augmenter` may be a PAS workdir, loaded here."""
    if name in AUGMENTERS and not replace:
        raise ValueError(f"GRPO augmenter {name!r} is already registered; pass replace=True to replace it")
    aug = Augmenter.load(augmenter) if isinstance(augmenter, str) else augmenter

    def hook(prompt: list[dict], row: Mapping[str, Any]) -> list[dict]:
        return aug.augment_messages(prompt)

    # A rollout's prompts in one batched PAS call instead of one generate call per prompt.
    hook.batch = lambda prompts, rows: aug.augment_conversations(prompts)  # type: ignore[attr-defined]
    AUGMENTERS[name] = hook


def augmenter(name: str) -> Callable[[list[dict], Mapping[str, Any]], list[dict]]:
    """The registered augmenter `name`; "pas:WORKDIR" registers a trained pas stage's model on first use."""
    if name.startswith("pas:") and name not in AUGMENTERS:
        register_grpo_augmenter(name, name[len("pas:") :])
    if name not in AUGMENTERS:
        raise ValueError(f"config.augment={name!r}; registered augmenters: {sorted(AUGMENTERS)}")
    return AUGMENTERS[name]


def augment_rows(augmenter: Augmenter, rows: Sequence[Mapping[str, Any]], *, where: str = "input") -> list[dict]:
    """Each row plus "complement" and "augmented_prompt" (a string for a string prompt, messages with
    the last user turn augmented for a message-list prompt); one batched PAS call for all rows."""
    from align_jax.pas.jsonl import prompt_of

    texts = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "prompt" not in row:
            raise ValueError(f"{where} row {i}: no 'prompt' field")
        texts.append(prompt_of(row, f"{where} row {i}", turn="last"))
    comps = augmenter.complements(texts)
    out = []
    for row, text, comp in zip(rows, texts, comps, strict=True):
        prompt = row["prompt"]
        if isinstance(prompt, str):
            augmented: Any = augmenter.join(prompt, comp)
        else:
            augmented = [dict(m) for m in prompt]
            last = max(k for k, m in enumerate(augmented) if m.get("role") == "user")
            augmented[last]["content"] = augmenter.join(text, comp)
        out.append({**row, "complement": comp, "augmented_prompt": augmented})
    return out
