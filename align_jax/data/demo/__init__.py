"""The bundled demo SFT chats (sft_train.jsonl, sft_eval.jsonl) and `make_demo_data`, which writes them."""
