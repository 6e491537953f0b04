"""T5 text encoder for caption features (docs/mugv.md §1.2): a transformers ``T5EncoderModel`` plus its tokenizer.

Production loads T5-v1.1-XXL with ``TextEncoder.from_pretrained(path_or_id, max_length=300)``. Tests and the tiny
pipeline build ``TextEncoder.tiny(...)``: a random-init T5 from ``T5Config`` and a byte-level tokenizer built in code
(256-byte alphabet, no merges), so nothing is downloaded. ``AutoModel`` would load an encoder-decoder ``T5Model``,
hence ``T5EncoderModel`` explicitly (feasibility check 9).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def state_dict_sha256(state: Dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def byte_level_tokenizer(max_length: int):
    """Deterministic byte-level tokenizer: ids 0/1/2 = <pad>/</s>/<unk>, then the 256 ByteLevel byte symbols.

    Every text ends with </s> (as T5's); vocab size 259. Round-trips any UTF-8 text exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate((PAD, EOS, UNK))}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=max_length)


class TextEncoder:
    """Tokenizer + T5 encoder: ``encode(texts) -> (feats [B, L, D] float32, mask [B, L] bool)``, L = max_length."""

    def __init__(self, model, tokenizer, max_length: int, pretrained: str = "") -> None:
        if max_length < 1:
            raise ValueError(f"TextEncoder: max_length must be >= 1, got {max_length}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pretrained = pretrained

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        return self

    @classmethod
    def tiny(cls, d_model: int = 64, num_layers: int = 2, num_heads: int = 4, d_ff: int = 128,
             max_length: int = 32, seed: int = 0) -> "TextEncoder":
        """Random-init T5 encoder (same seed -> same weights) with the byte-level tokenizer; no network."""
        from transformers import T5Config, T5EncoderModel

        if d_model % num_heads:
            raise ValueError(f"TextEncoder.tiny: d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        tokenizer = byte_level_tokenizer(max_length)
        config = T5Config(  # type: ignore[call-arg]  # transformers' stubs miss T5's generation kwargs
            vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
            num_layers=num_layers, num_heads=num_heads, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        return cls(model, tokenizer, max_length)

    @staticmethod
    def _load_parts(path_or_id: str | Path, dtype: Optional[torch.dtype]):
        from transformers import AutoTokenizer, T5EncoderModel

        kw = {"dtype": dtype} if dtype is not None else {}
        return T5EncoderModel.from_pretrained(str(path_or_id), **kw), AutoTokenizer.from_pretrained(str(path_or_id))

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, max_length: int,
                        dtype: Optional[torch.dtype] = None) -> "TextEncoder":
        """Load a T5 encoder + tokenizer from a local folder or hub id (set HF_HUB_OFFLINE=1 on offline hosts)."""
        model, tokenizer = cls._load_parts(path_or_id, dtype)
        return cls(model, tokenizer, max_length, pretrained=str(path_or_id))

    def save(self, out_dir: str | Path) -> None:
        """transformers ``save_pretrained`` of the encoder and the tokenizer (max_length kept as model_max_length)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out))
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(str(out))

    @classmethod
    def load(cls, in_dir: str | Path, max_length: Optional[int] = None) -> "TextEncoder":
        """Inverse of ``save``; max_length defaults to the saved tokenizer's model_max_length."""
        model, tokenizer = cls._load_parts(in_dir, None)
        return cls(model, tokenizer, int(max_length or tokenizer.model_max_length))

    @torch.no_grad()
    def encode(self, texts: List[str], batch_size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
        """texts (B) -> feats_BLD float32 (zero at padding), mask_BL bool, both padded/truncated to max_length."""
        if isinstance(texts, str):
            raise ValueError("TextEncoder.encode expects a list of strings, got one str")
        feats, masks = [], []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[i:i + batch_size]), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            ids_BL, mask_BL = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            h_BLD = self.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state.float()
            feats.append((h_BLD * mask_BL[..., None]).cpu())
            masks.append(mask_BL.bool().cpu())
        if not feats:
            return torch.zeros(0, self.max_length, self.dim), torch.zeros(0, self.max_length, dtype=torch.bool)
        return torch.cat(feats), torch.cat(masks)

    def identity(self) -> Dict[str, Any]:
        """{"config": architecture + max_length, "pretrained": source id or "", "weights_sha256": ...}."""
        c = self.model.config
        config = {"d_model": c.d_model, "num_layers": c.num_layers, "num_heads": c.num_heads, "d_ff": c.d_ff,
                  "d_kv": c.d_kv, "vocab_size": c.vocab_size, "max_length": self.max_length}
        return {"config": config, "pretrained": self.pretrained,
                "weights_sha256": state_dict_sha256(self.model.state_dict())}
