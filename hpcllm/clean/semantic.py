"""Semantic dedup of SFT prompts: mean-pooled embeddings of a local encoder (e.g. bge-small-zh, given
by path, never downloaded); a prompt whose cosine similarity to an already kept one reaches the
threshold is removed. One task over the whole set (after exact and MinHash dedup shrank it): the
kept embeddings stay in memory (10^6 prompts x 512 dims in fp32 = 2 GB)."""
from __future__ import annotations

import contextlib

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep


class SemanticDedup(PipelineStep):
    name = "semantic_dedup"
    type = "🫂 - DEDUP"

    def __init__(self, model_path: str, threshold: float, batch_size: int, max_length: int, exclusion_writer=None):
        super().__init__()
        self.model_path, self.threshold = model_path, threshold
        self.batch_size, self.max_length = batch_size, max_length
        self.exclusion_writer = exclusion_writer

    def _encoder(self):
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            model = AutoModel.from_pretrained(self.model_path).eval()
        except (OSError, ValueError) as e:
            raise ValueError(f"semantic_dedup.model_path={self.model_path!r}: cannot load an encoder ({e})") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return tokenizer, model.to(device), device

    def embed(self, texts, tokenizer, model, device):
        import torch

        batch = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tokenizer, model, device = self._encoder()
        kept = None
        with self.exclusion_writer or contextlib.nullcontext() as writer:
            batch = []
            for doc in data:
                batch.append(doc)
                if len(batch) == self.batch_size:
                    kept = yield from self._dedup_batch(batch, kept, tokenizer, model, device, writer, rank)
                    batch = []
            if batch:
                yield from self._dedup_batch(batch, kept, tokenizer, model, device, writer, rank)

    def _dedup_batch(self, docs, kept, tokenizer, model, device, writer, rank):
        """Keeps a document unless it is as similar as ``threshold`` to a kept one (earlier batches or
        earlier in this batch); returns the grown matrix of kept embeddings."""
        import torch

        emb = self.embed([d.text for d in docs], tokenizer, model, device)
        best = (emb @ kept.T).max(dim=1).values if kept is not None and len(kept) else torch.full((len(docs),), -1.0)
        fresh = []
        for i, doc in enumerate(docs):
            score = float(best[i])
            if fresh:
                score = max(score, float((emb[fresh] @ emb[i]).max()))
            self.stat_update("total")
            if score >= self.threshold:
                self.stat_update("dropped")
                doc.metadata["semantic_similarity"] = round(score, 4)
                if writer:
                    writer.write(doc, rank)
                continue
            fresh.append(i)
            yield doc
        new = emb[fresh]
        return new if kept is None else torch.cat([kept, new])
