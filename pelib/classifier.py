"""MiniLM as a classifier the way it was trained: the mean of its token states, not [CLS].

all-MiniLM-L6-v2 was trained (sentence-transformers) to make the *mean* of its last hidden
states over the real tokens a sentence embedding. transformers' BertForSequenceClassification
instead feeds the [CLS] state through a pooler (dense + tanh) that this checkpoint never
trained for that purpose. Measured on the Banking77 dev split (docs/benchmarks.md): a frozen
linear probe on mean-pooled features reaches macro-F1 0.937, on [CLS] + pooler 0.915 (L2
chosen on dev); LoRA r=8 after one epoch 0.908 with mean pooling, 0.751 with [CLS] + pooler.

    pooled = sum_t mask_t h_t / sum_t mask_t          (B, H) from h: (B, T, H), mask: (B, T)
    logits = classifier(dropout(pooled))              (B, num_labels)

BertForSequenceClassification cannot express this pooling, so a saved classifier is not a
"bert" model: `save_pretrained` writes model_type "pelib_mean_pool_bert" (base weights with any
merged LoRA update folded in), and importing pelib registers that type with transformers' Auto
classes. Then `AutoModelForSequenceClassification.from_pretrained(folder)` and
`pipeline("text-classification", model=folder)` build this class with the fine-tuned weights;
without pelib, transformers refuses the unknown type instead of building a [CLS] model.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import (
    BertForSequenceClassification,
    BertModel,
    BertPreTrainedModel,
)

POOLINGS = ("mean", "cls")
MODEL_TYPE = "pelib_mean_pool_bert"


class MeanPoolBertConfig(BertConfig):
    """BERT's config under its own model type: the saved folder says how the model pools."""

    model_type = MODEL_TYPE


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): the average over the tokens the mask keeps (no padding)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MeanPoolBertClassifier(BertPreTrainedModel):
    """BERT encoder (no pooler), mean pooling, dropout, a linear head named `classifier` (the
    name peft's sequence-classification task trains as a module to save)."""

    config_class = MeanPoolBertConfig

    def __init__(self, config):
        # in memory a plain BertConfig (model_type "bert": what the methods key their layers on);
        # only the saved folder carries the pelib type (save_pretrained)
        config = _with_config_class(config, BertConfig)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        p = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs) -> SequenceClassifierOutput:
        # kwargs: what peft's wrapper passes along (output_attentions, return_dict...), unused
        if attention_mask is None:
            shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            device = (input_ids if input_ids is not None else inputs_embeds).device
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids, position_ids=position_ids,
                           inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.classifier(self.dropout(mean_pool(hidden, attention_mask)))
        loss = None
        if labels is not None:  # fp32 loss also under bf16 autocast
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """transformers' save_pretrained, with each pelib layer that wraps a base layer
        (`base_layer`) saved as that base layer: merged LoRA weights become plain Linear weights,
        so the folder loads without pelib's layers. An unmerged adapter is refused."""
        wrapped = [(n, m) for n, m in self.named_modules() if hasattr(m, "base_layer")]
        unmerged = [n for n, m in wrapped if not getattr(m, "merged", False)]
        if unmerged and state_dict is None:
            raise ValueError(f"{unmerged[0]} holds an adapter that is not merged into its base "
                             "weight; call pelib.lora.merge(model) first (or save the adapter "
                             "alone with pelib.save_adapter)")
        if state_dict is None and wrapped:
            state_dict = {}
            for k, v in self.state_dict().items():
                owner = next((n for n, _ in wrapped if k.startswith(n + ".")), None)
                if owner is None:
                    state_dict[k] = v
                elif k.startswith(owner + ".base_layer."):  # its other tensors are the adapter's
                    state_dict[owner + k[len(owner) + len(".base_layer"):]] = v
        bert = self.config
        self.config = _with_config_class(bert, MeanPoolBertConfig)
        try:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        finally:
            self.config = bert


def _with_config_class(config, cls):
    """`config` as an instance of exactly `cls` (BertConfig or MeanPoolBertConfig), same fields."""
    if type(config) is cls:
        return config
    out = cls.from_dict({k: v for k, v in config.to_dict().items() if k != "model_type"})
    out._attn_implementation = config._attn_implementation
    return out


# pelib's saved classifiers load through transformers' Auto classes and pipelines
AutoConfig.register(MODEL_TYPE, MeanPoolBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MeanPoolBertConfig, MeanPoolBertClassifier,
                                            exist_ok=True)


def split_head(model: nn.Module):
    """(features, head) with model(input_ids, attention_mask).logits == head(features(...)),
    for the classifiers pelib builds; None for any other model.

    When only the head trains, the trunk maps each row to the same features in every epoch, so
    the floor (`--method head`) computes them once and trains the head on them (pelib.train).
        features(input_ids, attention_mask)    (B, H): the pooled state the head reads
        head(features)                         (B, num_labels)
    """
    if isinstance(model, MeanPoolBertClassifier):
        def features(input_ids, attention_mask):
            hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return mean_pool(hidden, attention_mask)
        return features, lambda f: model.classifier(model.dropout(f))
    if isinstance(model, BertForSequenceClassification):  # [CLS] + pooler
        def features(input_ids, attention_mask):
            return model.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return features, lambda f: model.classifier(model.dropout(f))
    if isinstance(model, GenericForSequenceClassification):  # Llama: the last real token
        def features(input_ids, attention_mask):
            base = getattr(model, model.base_model_prefix)
            hidden = base(input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
            pad = model.config.get_text_config().pad_token_id
            if pad is None:
                return hidden[:, -1]
            # the rightmost token that is not padding, as transformers' forward picks it
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
            last = (positions * (input_ids != pad)).argmax(-1)
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        # score is linear per position: scoring the picked state equals picking the scored one
        return features, model.score
    return None
