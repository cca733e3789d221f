"""The bundled demo data and `make_demo_data`, which writes it: SFT chats (sft_train.jsonl, sft_eval.jsonl)
and preference pairs (pref_train.jsonl, pref_eval.jsonl)."""
