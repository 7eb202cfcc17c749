"""Evaluation helpers: answer extraction and scoring (answers), local VQA JSONL data (vqa_data)."""
