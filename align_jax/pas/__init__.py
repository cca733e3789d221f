"""Prompt Augmentation System (PAS) of the Baichuan alignment report: curate a prompt set, have a teacher
write a complementary prompt for each (checked by a judge, regenerated when invalid), train a small PAS
model on (prompt -> complement) with the sft stage, and at inference append its complement to the user
prompt.

Pipeline, end to end (every name below is importable from `align_jax.pas`):

    prompts = read_prompts("chats.jsonl")                       # {"prompt": str | messages} or {"messages": [...]}
    embedder = load_embedder("hashed")                          # or a workdir / HF decoder dir (ChatModel.embed),
                                                                # or an HF encoder dir (HFEncoderEmbedder, torch)
    tagger = CentroidTagger(embedder, DEMO_TAG_EXAMPLES)        # or TeacherTagger(chat_model, categories), DemoRuleTagger()
    cur = curate(prompts, embedder=embedder, dedup_threshold=0.9, n_clusters=64, per_cluster=40,
                 quality=None, min_quality=None, tagger=tagger, balance_cap=600, seed=0)
    cur.counts   # {"input", "after_exact_dedup", "after_dedup", "after_diversity", "after_quality",
                 #  "after_balance", "unscored"}; cur.seconds: wall time per step
    cur.rows     # [{"prompt", "category", "cluster", "quality", "index"}]

    rows = generate_complements(cur.rows, teacher, judge, max_attempts=3, few_shot=3, seed=0, batch=64)
    #   teacher: ChatModel (or anything with .generate(chats, max_new_tokens=, temperature=, seed=)),
    #            TemplateTeacher() in the offline demo (a rule-based stand-in for a teacher LLM)
    #   judge:   ModelJudge(chat_model) or RuleJudge()
    #   rows:    [{"prompt", "complement", "category", "verdict": "valid"|"invalid", "reason", "attempts"}]
    write_jsonl("complements.jsonl", rows)                      # atomic (tmp + os.replace)
    write_jsonl("pas_sft.jsonl", sft_rows(rows))                # valid rows as {"messages": [system, user, assistant]}
    #   -> train the PAS model with the sft stage (configs/sft.py, data.train = pas_sft.jsonl)

    aug = Augmenter.load("runs/pas")                            # Augmenter(chat_model, max_new_tokens=64,
    aug.augment(["What is 2 plus 3?"])                          #   template="{prompt}\\n\\n{complement}")
    aug.augment_messages(messages)                              # last user turn augmented
    register_grpo_augmenter("pas", aug)                         # config.augment = "pas"

Command line: `python launch/augment.py --pas WORKDIR --input prompts.jsonl --output out.jsonl`.

Signatures:

    curate(prompts: Sequence[str], *, embedder, dedup_threshold=0.9, n_clusters: int | Sequence[int] = 100,
           per_cluster: int | None = 10, select="nearest"|"spread", quality=None, min_quality=None,
           tagger=None, balance_cap: int | Mapping[str, int] | None = None, seed=0) -> CurationResult
    dedup_mask(embeddings [N, E], threshold, *, block=512, chunk=4096) -> bool [N]
    kmeans(x, k, *, seed=0, iters=100, tol=1e-6, block=2048) -> KMeansResult(centroids, labels, inertia, iterations)
    hierarchical_kmeans(x, ks: Sequence[int], *, seed=0) -> KMeansResult (leaf clusters)
    select_per_cluster(x, labels, centroids, per_cluster, *, how="nearest"|"spread") -> sorted indices
    balance(categories, cap, priority=None) -> sorted indices
    generate_complements(rows, teacher, judge, *, max_attempts=3, few_shot=3, examples=None, seed=0, batch=64,
                         temperature=0.7, temperature_step=0.2, max_new_tokens=64) -> list[dict]
    sft_rows(complement_rows, *, system=PAS_SYSTEM) -> list[{"messages": [...]}]
    write_jsonl(path, rows) -> int;  read_jsonl(path) -> list[dict];  read_prompts(path, *, field="prompt", turn="first")
    Augmenter(pas_model, *, max_new_tokens=64, template="{prompt}\\n\\n{complement}", system=PAS_SYSTEM,
              temperature=0.0, seed=0, batch=64, cache_size=100_000); Augmenter.load(workdir, *, step=None, batch_size=16)
    register_grpo_augmenter(name, augmenter: Augmenter | str, *, replace=False)
    augment_rows(augmenter, rows) -> rows + "complement", "augmented_prompt"   (what launch/augment.py writes)

Module map: embed (embedders), dedup (blocked near-dup removal), cluster (k-means, hierarchical,
diversity selection), quality (RM / judge scores), tags (taggers, balance), curate (the curation
steps), templates (prompts, few-shot examples, PAS_SYSTEM), teacher (TemplateTeacher, demo tagging),
judge (RuleJudge, ModelJudge), complement (generation loop, SFT rows), augment (Augmenter, GRPO hook),
jsonl (file I/O).
"""

from align_jax.pas.augment import Augmenter, augment_rows, register_grpo_augmenter
from align_jax.pas.cluster import KMeansResult, hierarchical_kmeans, kmeans, select_per_cluster
from align_jax.pas.complement import (
    COMPLEMENT_KEYS,
    check_complement_row,
    generate_complements,
    sft_rows,
    summarize,
)
from align_jax.pas.curate import CurationResult, curate
from align_jax.pas.dedup import dedup_brute_force, dedup_mask
from align_jax.pas.embed import Embedder, HashedEmbedder, HFEncoderEmbedder, load_embedder
from align_jax.pas.jsonl import read_jsonl, read_prompts, write_jsonl
from align_jax.pas.judge import ModelJudge, RuleJudge, Verdict, parse_verdict
from align_jax.pas.quality import JudgeQuality, RewardQuality, parse_score
from align_jax.pas.tags import CentroidTagger, TeacherTagger, balance, parse_category
from align_jax.pas.teacher import DemoRuleTagger, TemplateTeacher, demo_category
from align_jax.pas.templates import DEMO_CATEGORIES, DEMO_TAG_EXAMPLES, FEW_SHOT, INVALID_KINDS, PAS_SYSTEM

__all__ = [
    "COMPLEMENT_KEYS",
    "DEMO_CATEGORIES",
    "DEMO_TAG_EXAMPLES",
    "FEW_SHOT",
    "INVALID_KINDS",
    "PAS_SYSTEM",
    "Augmenter",
    "CentroidTagger",
    "CurationResult",
    "DemoRuleTagger",
    "Embedder",
    "HFEncoderEmbedder",
    "HashedEmbedder",
    "JudgeQuality",
    "KMeansResult",
    "ModelJudge",
    "RewardQuality",
    "RuleJudge",
    "TeacherTagger",
    "TemplateTeacher",
    "Verdict",
    "augment_rows",
    "balance",
    "check_complement_row",
    "curate",
    "dedup_brute_force",
    "dedup_mask",
    "demo_category",
    "generate_complements",
    "hierarchical_kmeans",
    "kmeans",
    "load_embedder",
    "parse_category",
    "parse_score",
    "parse_verdict",
    "read_jsonl",
    "read_prompts",
    "register_grpo_augmenter",
    "select_per_cluster",
    "sft_rows",
    "summarize",
    "write_jsonl",
]
