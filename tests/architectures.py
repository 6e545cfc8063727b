"""The architecture matrix: tiny configs of Hugging Face architectures, and the inputs each takes.

Each entry names a config class, a model class (one that takes ``labels`` where the architecture
has one), config overrides that make it tiny (hidden 32, 2 layers), and the kind of input it reads.
``tests/test_architectures.py`` runs every entry; ``docs/make_architectures.py`` renders the table
in ``docs/architectures.md`` from the same list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

H, L, NH, FF, V = 32, 2, 4, 64, 100
TEXT = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF, vocab_size=V)
DECODER = dict(TEXT, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SEQ2SEQ = dict(
    d_model=H,
    encoder_layers=L,
    decoder_layers=L,
    encoder_attention_heads=NH,
    decoder_attention_heads=NH,
    encoder_ffn_dim=FF,
    decoder_ffn_dim=FF,
    vocab_size=V,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=2,
)
T5 = dict(
    d_model=H,
    d_kv=8,
    d_ff=FF,
    num_layers=L,
    num_decoder_layers=L,
    num_heads=NH,
    vocab_size=V,
    decoder_start_token_id=0,
)
VISION = dict(
    hidden_size=H,
    num_hidden_layers=L,
    num_attention_heads=NH,
    intermediate_size=FF,
    image_size=16,
    patch_size=4,
    num_channels=3,
)


@dataclass(frozen=True)
class Arch:
    """One architecture of the matrix."""

    name: str
    config: str  # transformers config class
    model: str  # transformers model class (a head taking labels where there is one)
    options: dict[str, Any] = field(default_factory=dict)
    inputs: str = "text"  # text | seq2seq | image | audio | clip
    labels: str | None = "tokens"  # tokens | class | None (the model class takes no labels)
    xfail: str | None = None  # why it cannot work yet (an expected, strict failure)

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        config = getattr(transformers, self.config)(**self.options)
        model = getattr(transformers, self.model)(config)
        return model.eval()


def _text(name, config, model, labels="tokens", **options):
    return Arch(name, config, model, {**TEXT, **options}, "text", labels)


def _decoder(name, config, model, **options):
    return Arch(name, config, model, {**DECODER, **options}, "text", "tokens")


def _seq2seq(name, config, model, **options):
    return Arch(name, config, model, {**SEQ2SEQ, **options}, "seq2seq", "tokens")


def _vision(name, config, model, labels="class", **options):
    return Arch(name, config, model, {**VISION, **options}, "image", labels)


ARCHS: list[Arch] = [
    # encoders
    _text("bert", "BertConfig", "BertForMaskedLM"),
    _text("roberta", "RobertaConfig", "RobertaForMaskedLM", pad_token_id=1),
    _text("xlm_roberta", "XLMRobertaConfig", "XLMRobertaForMaskedLM", pad_token_id=1),
    _text("camembert", "CamembertConfig", "CamembertForMaskedLM", pad_token_id=1),
    _text("data2vec_text", "Data2VecTextConfig", "Data2VecTextForMaskedLM", pad_token_id=1),
    _text("xmod", "XmodConfig", "XmodForMaskedLM", pad_token_id=1, default_language="en_XX"),
    _text("ernie", "ErnieConfig", "ErnieForMaskedLM"),
    _text("megatron_bert", "MegatronBertConfig", "MegatronBertForMaskedLM"),
    _text("roformer", "RoFormerConfig", "RoFormerForMaskedLM", embedding_size=H),
    _text("mpnet", "MPNetConfig", "MPNetForMaskedLM", pad_token_id=1),
    _text("electra", "ElectraConfig", "ElectraForMaskedLM", embedding_size=H),
    _text("albert", "AlbertConfig", "AlbertForMaskedLM", embedding_size=16),
    Arch(
        "distilbert",
        "DistilBertConfig",
        "DistilBertForMaskedLM",
        dict(dim=H, n_layers=L, n_heads=NH, hidden_dim=FF, vocab_size=V),
    ),
    _text(
        "deberta",
        "DebertaConfig",
        "DebertaForMaskedLM",
        relative_attention=True,
        max_relative_positions=8,
        pos_att_type=["c2p", "p2c"],
    ),
    _text(
        "deberta_v2",
        "DebertaV2Config",
        "DebertaV2ForMaskedLM",
        relative_attention=True,
        position_buckets=4,
        max_relative_positions=8,
        pos_att_type=["c2p", "p2c"],
        share_att_key=True,
    ),
    _text(
        "modernbert",
        "ModernBertConfig",
        "ModernBertForMaskedLM",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        global_attn_every_n_layers=2,
        local_attention=4,
    ),
    _text("bert_generation", "BertGenerationConfig", "BertGenerationDecoder", is_decoder=True),
    _text(
        "esm",
        "EsmConfig",
        "EsmForMaskedLM",
        pad_token_id=1,
        mask_token_id=2,
        position_embedding_type="rotary",
    ),
    # decoders
    Arch("gpt2", "GPT2Config", "GPT2LMHeadModel", dict(n_embd=H, n_layer=L, n_head=NH, vocab_size=V)),
    Arch(
        "gpt_neo",
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            hidden_size=H,
            num_layers=L,
            num_heads=NH,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            vocab_size=V,
            intermediate_size=FF,
        ),
    ),
    Arch(
        "gptj",
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(n_embd=H, n_layer=L, n_head=NH, rotary_dim=4, vocab_size=V),
    ),
    _decoder("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.5),
    Arch("bloom", "BloomConfig", "BloomForCausalLM", dict(hidden_size=H, n_layer=L, n_head=NH, vocab_size=V)),
    _decoder(
        "falcon",
        "FalconConfig",
        "FalconForCausalLM",
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        bias=False,
    ),
    _decoder(
        "falcon_new",
        "FalconConfig",
        "FalconForCausalLM",
        new_decoder_architecture=True,
        num_kv_heads=2,
        bias=True,
    ),
    Arch(
        "opt",
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=H,
            num_hidden_layers=L,
            num_attention_heads=NH,
            ffn_dim=FF,
            vocab_size=V,
            word_embed_proj_dim=H,
            max_position_embeddings=64,
        ),
    ),
    _decoder("llama", "LlamaConfig", "LlamaForCausalLM"),
    _decoder("mistral", "MistralConfig", "MistralForCausalLM"),
    _decoder("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    _decoder("qwen3", "Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    _decoder("phi", "PhiConfig", "PhiForCausalLM"),
    _decoder("phi3", "Phi3Config", "Phi3ForCausalLM"),
    _decoder("gemma", "GemmaConfig", "GemmaForCausalLM", head_dim=8),
    _decoder("gemma2", "Gemma2Config", "Gemma2ForCausalLM", head_dim=8, attn_implementation="eager"),
    _decoder("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8),
    _decoder("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM"),
    _decoder("stablelm", "StableLmConfig", "StableLmForCausalLM"),
    _decoder("olmo", "OlmoConfig", "OlmoForCausalLM"),
    _decoder("olmo2", "Olmo2Config", "Olmo2ForCausalLM"),
    _decoder("cohere", "CohereConfig", "CohereForCausalLM"),
    _decoder("granite", "GraniteConfig", "GraniteForCausalLM"),
    _decoder("persimmon", "PersimmonConfig", "PersimmonForCausalLM"),
    Arch(
        "codegen",
        "CodeGenConfig",
        "CodeGenForCausalLM",
        dict(n_embd=H, n_layer=L, n_head=NH, rotary_dim=4, vocab_size=V, n_positions=64),
    ),
    Arch(
        "gpt_bigcode",
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(n_embd=H, n_layer=L, n_head=NH, vocab_size=V, multi_query=True),
    ),
    _decoder("biogpt", "BioGptConfig", "BioGptForCausalLM"),
    Arch(
        "xglm",
        "XGLMConfig",
        "XGLMForCausalLM",
        dict(
            d_model=H, num_layers=L, attention_heads=NH, ffn_dim=FF, vocab_size=V, max_position_embeddings=64
        ),
    ),
    _decoder("mixtral", "MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
    _decoder(
        "qwen2_moe",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
    ),
    _decoder(
        "qwen3_moe",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    ),
    # encoder-decoders
    _seq2seq("bart", "BartConfig", "BartForConditionalGeneration"),
    _seq2seq("mbart", "MBartConfig", "MBartForConditionalGeneration"),
    _seq2seq("plbart", "PLBartConfig", "PLBartForConditionalGeneration"),
    _seq2seq("pegasus", "PegasusConfig", "PegasusForConditionalGeneration"),
    _seq2seq("marian", "MarianConfig", "MarianMTModel", decoder_vocab_size=V),
    _seq2seq("blenderbot", "BlenderbotConfig", "BlenderbotForConditionalGeneration"),
    _seq2seq("blenderbot_small", "BlenderbotSmallConfig", "BlenderbotSmallForConditionalGeneration"),
    _seq2seq(
        "m2m_100",
        "M2M100Config",
        "M2M100ForConditionalGeneration",
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
    ),
    Arch("t5", "T5Config", "T5ForConditionalGeneration", T5, "seq2seq"),
    Arch("mt5", "MT5Config", "MT5ForConditionalGeneration", T5, "seq2seq"),
    Arch("umt5", "UMT5Config", "UMT5ForConditionalGeneration", T5, "seq2seq"),
    Arch(
        "whisper",
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        dict(
            SEQ2SEQ,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=16,
            decoder_start_token_id=1,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        ),
        "seq2seq",
    ),
    # vision and multimodal
    _vision("vit", "ViTConfig", "ViTForImageClassification", num_labels=3),
    _vision("deit", "DeiTConfig", "DeiTForImageClassification", num_labels=3),
    _vision(
        "beit", "BeitConfig", "BeitForImageClassification", num_labels=3, use_relative_position_bias=True
    ),
    _vision("dinov2", "Dinov2Config", "Dinov2ForImageClassification", num_labels=3, mlp_ratio=2),
    _vision("data2vec_vision", "Data2VecVisionConfig", "Data2VecVisionForImageClassification", num_labels=3),
    Arch(
        "swin",
        "SwinConfig",
        "SwinForImageClassification",
        dict(
            image_size=16,
            patch_size=2,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            num_labels=3,
            drop_path_rate=0.1,
        ),
        "image",
        "class",
    ),
    _vision("clip_vision", "CLIPVisionConfig", "CLIPVisionModel", labels=None),
    _vision("siglip_vision", "SiglipVisionConfig", "SiglipVisionModel", labels=None),
    _text("clip_text", "CLIPTextConfig", "CLIPTextModel", labels=None, max_position_embeddings=64),
]


def inputs(arch: Arch, model: torch.nn.Module, b: int = 2, s: int = 7, labels: bool = False) -> dict:
    """A batch for ``model``: padded text, images, audio features, or an encoder-decoder pair."""
    g = torch.Generator().manual_seed(b * 100 + s)
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    if arch.inputs in ("text", "seq2seq"):
        if arch.name == "whisper":
            out["input_features"] = torch.randn(
                b, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g
            )
        else:
            ids = torch.randint(3, V, (b, s), generator=g)
            mask = torch.ones_like(ids)
            mask[-1, s - 2 :] = 0
            out["input_ids"], out["attention_mask"] = ids, mask
    if arch.inputs == "image":
        size = cfg.image_size
        out["pixel_values"] = torch.randn(b, cfg.num_channels, size, size, generator=g)
    target = torch.randint(3, V, (b, s - 2), generator=g)
    if arch.inputs == "seq2seq" and not labels:
        out["decoder_input_ids"] = target
    if labels and arch.labels == "tokens":
        out["labels"] = target if arch.inputs == "seq2seq" else out["input_ids"].clone()
    elif labels and arch.labels == "class":
        out["labels"] = torch.randint(0, cfg.num_labels, (b,), generator=g)
    return out
