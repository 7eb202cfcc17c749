"""Data pipelines. LVR stage 1: records (llava_records), special tokens (lvr_tokens), samples
(lvr_dataset), batches (collate), sample inspection (describe)."""

from megatron_latent.data.collate import collate, make_collate
from megatron_latent.data.describe import describe_sample, format_description
from megatron_latent.data.lvr_dataset import (DEFAULT_SYSTEM, STAGE1_MAX_PIXELS, STAGE1_MIN_PIXELS,
                                              LvrSftDataset)
from megatron_latent.data.llava_records import (LvrDataError, Record, RecordStore, bbox_token_indices,
                                              load_records, validate_record)
from megatron_latent.data.lvr_tokens import LVR_TOKENS, TokenIds, add_lvr_tokens, load_hf_processing

__all__ = ["collate", "make_collate", "describe_sample", "format_description", "DEFAULT_SYSTEM",
           "LVR_TOKENS", "STAGE1_MAX_PIXELS", "STAGE1_MIN_PIXELS", "LvrSftDataset", "TokenIds",
           "add_lvr_tokens", "load_hf_processing", "LvrDataError", "Record", "RecordStore",
           "bbox_token_indices", "load_records", "validate_record"]
