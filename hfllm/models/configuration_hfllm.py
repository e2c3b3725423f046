"""Configuration of hfllm's decoder family: Llama-style dense, Mistral-style sliding window, and MoE.

One config covers every variant; the variant is a matter of fields:
  - dense Llama: the defaults (GQA/MQA through `num_key_value_heads`, optional `qk_norm` and qkv bias)
  - sliding window: `sliding_window=W` and `layer_types` ("sliding_attention" / "full_attention" per layer)
  - MoE: `num_experts > 0` (top-k routing, optional shared experts, aux-loss-free balancing)
  - positions: `position_embedding` "rope" (default), "alibi" (Press et al. 2022) or "none" (NoPE)
  - modded-nanogpt's speedrun options: `mlp_activation: relu2`, `final_logit_softcapping`, `value_embeddings`,
    `unet_skips`, `zero_init_output_projections`
  - Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524): `num_recursions`, `recursion_sharing`,
    `recursion_balance_loss_coef`
  - Mamba-2 hybrids: `layer_types` entries "mamba" (a Mamba-2 mixer in place of attention) and the `mamba_*` fields
  - Mixture of Depths (Raposo et al. 2024): `mod_capacity`, `mod_layers`, `mod_predictor_loss_coef`

This file is copied next to saved checkpoints (`trust_remote_code=True`), so it imports only transformers.
"""

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

LAYER_TYPES = ("full_attention", "sliding_attention", "mamba")
# A "mamba" layer is stored as "linear_attention": transformers' name for the layers whose cache holds conv and
# recurrent states (its Bamba / NemotronH / FalconH1 configs do the same, and every PreTrainedConfig rewrites "mamba"
# so), which is what makes `DynamicCache(config=...)` build those layers' state caches.
MAMBA = "linear_attention"
MAMBA_D_HEAD = 64  # Mamba-2's default head dimension P (Dao & Gu 2024; its reference code's headdim)
POSITION_EMBEDDINGS = ("rope", "alibi", "none")
MLP_ACTIVATIONS = ("gated", "relu2")
RECURSION_SHARINGS = ("middle_cycle", "cycle")
MODDED_NANOGPT_VALUE_EMBEDDINGS = 3  # `value_embeddings: true`: the record runs' three tables
ROPE_TYPES = ("default", *sorted(ROPE_INIT_FUNCTIONS))


class HfllmConfigError(ValueError):
    """An inconsistent configuration; the message names the field and what is allowed."""


class HfllmConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size: size of the token vocabulary.
        hidden_size: width of the residual stream.
        intermediate_size: hidden width of the dense SwiGLU MLP.
        num_hidden_layers: number of decoder layers, each with its own weights (the unique layers); with
            `num_recursions` the model applies some of them several times (`unrolled_num_layers`).
        num_attention_heads: number of query heads.
        num_key_value_heads: number of key/value heads (GQA); 1 is MQA; defaults to `num_attention_heads` (MHA).
        head_dim: width of one head; defaults to `hidden_size // num_attention_heads`.
        max_position_embeddings: longest sequence the rotary embedding is set up for.
        rope_parameters: `{"rope_type": ..., "rope_theta": ...}` plus the type's own keys
            (linear / dynamic: `factor`; yarn: `factor`, `original_max_position_embeddings`, ...; llama3: `factor`,
            `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
        attention_bias: bias on the q/k/v projections (Qwen2-style).
        attention_out_bias: bias on the output projection (Llama's `attention_bias` sets both).
        qk_norm: RMSNorm on each query/key head before RoPE (Qwen3 / OLMo-style stability).
        sliding_window: window size (tokens) of "sliding_attention" layers; None disables sliding attention.
        layer_types: per-layer "full_attention", "sliding_attention" or "mamba"; defaults to all sliding when
            `sliding_window` is set, else all full. A "mamba" layer (a Mamba-2 mixer where attention would be, the MLP
            kept, as in Jamba / Bamba / Nemotron-H) is stored under transformers' cache name "linear_attention".
        num_experts: experts per MoE layer; 0 makes every layer dense.
        num_experts_per_tok: experts each token is routed to (top-k).
        moe_intermediate_size: hidden width of one expert; defaults to `intermediate_size`.
        num_shared_experts: always-on experts (DeepSeek-style), fused into one MLP of width
            `num_shared_experts * moe_intermediate_size`.
        mlp_only_layers: layer indices that stay dense in an MoE model.
        norm_topk_prob: renormalise the top-k routing weights to sum to 1.
        router_aux_loss_coef: weight of the Switch-style load-balancing loss added to the LM loss; defaults to 0.01 for
            MoE models and 0 for dense ones (libraries such as TRL read a non-zero value as "this is an MoE").
        router_z_loss_coef: weight of the router z-loss (mean squared log-sum-exp of router logits).
        router_bias_update_rate: aux-loss-free balancing (DeepSeek-V3): after each optimizer step, each expert's
            routing bias moves by this amount towards balance; 0 disables it.
        output_router_logits: return router logits (and compute the auxiliary losses) by default; defaults to true
            with `num_recursions` (its balancing loss) and false otherwise.
        position_embedding: "rope" (rotary, `rope_parameters`), "alibi" (a per-head linear distance penalty on the
            attention scores, Press et al. 2022, arXiv 2108.12409) or "none" (NoPE: causal attention alone,
            Kazemnejad et al. 2023, arXiv 2305.19466).
        mlp_activation: "gated" (SwiGLU with `hidden_act`: down(act(gate(x)) * up(x))) or "relu2" (non-gated
            down(relu(up(x))^2), So et al. 2021, arXiv 2109.08668, as in modded-nanogpt's records).
        final_logit_softcapping: cap * tanh(logits / cap) on the LM head's logits (Gemma 2's field, arXiv 2408.00118;
            modded-nanogpt); None disables it.
        value_embeddings: number of extra token-embedding tables mixed into the attention values (modded-nanogpt):
            table i serves layer i and layer L - N + i, v = lambda_0 * v + lambda_1 * embedding(token); `true` means 3.
            A model of fewer than N layers builds one table per layer.
        unet_skips: U-net skips (modded-nanogpt): the outputs of the first L // 2 layers are added, with learned
            weights (initialised to 1), to the inputs of the last L // 2 layers in reverse order.
        zero_init_output_projections: initialise o_proj and down_proj to zero, so that every block starts as the
            identity (modded-nanogpt; "ReZero"-like, arXiv 2003.04887). Only the initialisation changes.
        num_recursions: Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524), N_r: a shared stack of layers is
            applied up to N_r times and a token-choice router picks each token's depth (1..N_r) from its hidden state
            where it enters the stack; keys/values of the first recursion are shared by the deeper ones (recursive KV
            sharing). 0 or 1 turns it off.
        recursion_sharing: which unique layers form the shared stack: "middle_cycle" (the paper's best: the first
            and the last layer unique, the L - 2 middle layers shared; needs 3 layers or more) or "cycle" (all L
            layers shared). The unrolled depth is 2 + N_r (L - 2), or N_r L.
        recursion_balance_loss_coef: weight of the recursion router's balancing loss (Switch-style over the N_r
            depths) added to the LM loss.
        mamba_d_state: state size N of each Mamba-2 head (Dao & Gu 2024, arXiv 2405.21060).
        mamba_d_conv: width of the causal depthwise convolution before the scan.
        mamba_expand: the mixer's inner width is `mamba_expand * hidden_size` = `mamba_n_heads * mamba_d_head`.
        mamba_n_heads: number of SSD heads; defaults to inner width / `mamba_d_head`.
        mamba_d_head: width P of one SSD head; defaults to inner width / `mamba_n_heads`, or 64 when neither is set.
        mamba_n_groups: groups sharing B and C (the SSM's GQA); must divide `mamba_n_heads`.
        mamba_chunk_size: chunk length of the chunked SSD scan (training and prefill).
        mamba_conv_bias: bias on the convolution.
        mamba_proj_bias: bias on the mixer's input and output projections.
        mod_capacity: Mixture of Depths (Raposo et al. 2024, arXiv 2404.02258): the fraction of a sequence's tokens
            that go through each routed layer (0.125 in the paper); the others ride the residual stream. None or 0
            turns it off.
        mod_layers: the routed layer indices; None (the default) routes every other layer (1, 3, 5, ...), as the
            paper does, also in a copy with fewer layers (`hfllm doctor`'s).
        mod_predictor_loss_coef: weight of the routing predictor's binary cross-entropy (it learns, on stop-gradient
            inputs, which tokens the training-time top-k picks; generation routes by it, causally).
    """

    model_type = "hfllm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the output field before and after transformers 5.24
    # Tensor parallel (`from_pretrained(distributed_config=DistributedConfig(tp_size=N))`, docs/scaling.md): heads and
    # MLP / expert widths are split, each block's output projection sums the ranks' parts (one all-reduce). The input
    # embedding is split over the vocabulary by transformers, the LM head by `_tp_plan`; the other norms and the router
    # stay whole on every rank. Each config keeps only the rules of the modules it builds (`_tp_plan_for_variant`).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",  # heads: nh / N query heads per rank
        "layers.*.self_attn.k_proj": "colwise",  # nkv / N key/value heads per rank (GQA groups stay whole)
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "hfllm_grad_sum",  # sees only this rank's heads: grads summed (modeling_hfllm.py)
        "layers.*.self_attn.k_norm": "hfllm_grad_sum",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",  # dense SwiGLU: intermediate_size / N per rank
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",  # (E, 2I, H): the gate half and the up half each split
        "layers.*.mlp.experts.down_proj": "rowwise",  # (E, H, I): I split
        "layers.*.mlp.experts": "moe_tp_experts",  # every rank runs its slice of every expert; outputs summed
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: int | float = 0.02
    rms_norm_eps: int | float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attention_dropout: int | float = 0.0
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    num_shared_experts: int = 0
    mlp_only_layers: list[int] | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: int | float | None = None
    router_z_loss_coef: int | float = 0.0
    router_bias_update_rate: int | float = 0.0
    output_router_logits: bool | None = None
    position_embedding: str = "rope"
    mlp_activation: str = "gated"
    final_logit_softcapping: int | float | None = None
    value_embeddings: int | bool = 0
    unet_skips: bool = False
    zero_init_output_projections: bool = False
    num_recursions: int = 0
    recursion_sharing: str = "middle_cycle"
    recursion_balance_loss_coef: int | float = 0.1
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_n_heads: int | None = None
    mamba_d_head: int | None = None
    mamba_n_groups: int = 1
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mod_capacity: int | float | None = None
    mod_layers: list[int] | None = None
    mod_predictor_loss_coef: int | float = 1.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self._check(
                self.hidden_size % self.num_attention_heads == 0,
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or set head_dim explicitly",
            )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        self.layer_types = [MAMBA if kind == "mamba" else kind for kind in self.layer_types]
        if self.has_mamba_layers:
            inner = self.mamba_expand * self.hidden_size
            if self.mamba_n_heads is None:
                self.mamba_d_head = self.mamba_d_head or min(MAMBA_D_HEAD, inner)
                self.mamba_n_heads = max(inner // self.mamba_d_head, 1)
            elif self.mamba_d_head is None:
                self.mamba_d_head = inner // self.mamba_n_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        if isinstance(self.value_embeddings, bool):
            self.value_embeddings = MODDED_NANOGPT_VALUE_EMBEDDINGS if self.value_embeddings else 0
        if self.output_router_logits is None:
            self.output_router_logits = self.num_recursions > 1
        if not self.mod_capacity:
            self.mod_capacity = None
        if self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = 0.01 if self.num_experts > 0 else 0.0
        if self.rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)
        self._validate_hfllm()
        self.base_model_tp_plan = self._tp_plan_for_variant()  # not saved: transformers leaves plans out of config.json

    def _tp_plan_for_variant(self) -> dict[str, str]:
        """The class's tensor-parallel plan without rules for modules this config does not build (transformers warns
        about each rule that matches nothing)."""
        has_dense_mlp = any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        builds = {
            ".self_attn.q_norm": self.qk_norm, ".self_attn.k_norm": self.qk_norm,
            ".mlp.gate_proj": has_dense_mlp and self.mlp_activation == "gated", ".mlp.up_proj": has_dense_mlp, ".mlp.down_proj": has_dense_mlp,
            ".mlp.experts": self.num_experts > 0, ".mlp.shared_experts.": self.num_experts > 0 and self.num_shared_experts > 0,
        }
        plan = type(self).base_model_tp_plan
        return {key: style for key, style in plan.items()
                if all(built for part, built in builds.items() if part in key)}

    def _check(self, condition: bool, message: str) -> None:
        if not condition:
            raise HfllmConfigError(message)

    def _validate_hfllm(self) -> None:
        """Shape and option checks; each failure names the field and what is allowed."""
        self._check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
            f"({self.num_key_value_heads})",
        )
        self._check(
            self.position_embedding in POSITION_EMBEDDINGS,
            f"unknown position_embedding '{self.position_embedding}'; allowed: {', '.join(POSITION_EMBEDDINGS)}",
        )
        self._check(
            self.position_embedding != "rope" or self.head_dim % 2 == 0,
            f"head_dim ({self.head_dim}) must be even for rotary embeddings",
        )
        rope_type = self.rope_parameters.get("rope_type", "default")
        self._check(
            rope_type in ROPE_TYPES, f"unknown rope_type '{rope_type}' in rope_parameters; allowed: {', '.join(ROPE_TYPES)}"
        )
        self._check(
            len(self.layer_types) == self.num_hidden_layers,
            f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}",
        )
        unknown = sorted(set(self.layer_types) - {*LAYER_TYPES, MAMBA})
        self._check(not unknown, f"layer_types has unknown entries {unknown}; allowed: {', '.join(LAYER_TYPES)}")
        self._check(
            "sliding_attention" not in self.layer_types or (self.sliding_window or 0) > 0,
            "layer_types has 'sliding_attention' layers but sliding_window is not a positive integer; set sliding_window",
        )
        self._check(
            self.mlp_activation in MLP_ACTIVATIONS,
            f"unknown mlp_activation '{self.mlp_activation}'; allowed: {', '.join(MLP_ACTIVATIONS)}",
        )
        self._check(
            self.mlp_activation == "gated" or self.num_experts == 0,
            "mlp_activation relu2 is for dense models; MoE experts are gated (set num_experts: 0 or mlp_activation: gated)",
        )
        self._check(
            self.final_logit_softcapping is None or self.final_logit_softcapping > 0,
            f"final_logit_softcapping ({self.final_logit_softcapping}) must be positive, or null to disable it",
        )
        self._check(self.value_embeddings >= 0, f"value_embeddings ({self.value_embeddings}) must be 0 or more")
        self._check(
            not self.unet_skips or self.num_hidden_layers >= 2,
            "unet_skips needs at least 2 layers (the first half's outputs feed the second half)",
        )
        self._check(self.num_recursions >= 0, f"num_recursions ({self.num_recursions}) must be 0 or more (0 or 1: off)")
        if self.num_recursions > 1:
            self._validate_recursions()
        if self.has_mamba_layers:
            self._validate_mamba()
        if self.mod_capacity is None:
            self._check(not self.mod_layers, "mod_layers needs mod_capacity (a fraction in (0, 1]) to route them")
        else:
            self._validate_mixture_of_depths()
        if self.num_experts > 0:
            self._check(
                1 <= self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts ({self.num_experts})",
            )
            bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            self._check(
                not bad_layers, f"mlp_only_layers {bad_layers} out of range 0..{self.num_hidden_layers - 1}"
            )

    def _validate_recursions(self) -> None:
        """Mixture-of-Recursions' checks: the sharing scheme, and the options it is not built for, each refused."""
        self._check(
            self.recursion_sharing in RECURSION_SHARINGS,
            f"unknown recursion_sharing '{self.recursion_sharing}'; allowed: {', '.join(RECURSION_SHARINGS)}",
        )
        self._check(
            self.recursion_sharing != "middle_cycle" or self.num_hidden_layers >= 3,
            f"recursion_sharing middle_cycle needs at least 3 layers (first and last unique, a shared middle); "
            f"num_hidden_layers is {self.num_hidden_layers}",
        )
        self._check(self.recursion_balance_loss_coef >= 0,
                    f"recursion_balance_loss_coef ({self.recursion_balance_loss_coef}) must be 0 or more")
        unsupported = {"num_experts > 0": self.num_experts > 0, "value_embeddings": self.value_embeddings > 0,
                       "unet_skips": self.unet_skips,
                       "sliding_attention layers": "sliding_attention" in self.layer_types,
                       "mamba layers": MAMBA in self.layer_types}
        for option, used in unsupported.items():
            self._check(not used, f"num_recursions ({self.num_recursions}) does not support {option} (layer-indexed or "
                                  "routed options); set num_recursions: 0 or turn the option off")

    def recursion_layout(self) -> tuple[list[int], list[int], list[int]]:
        """Mixture-of-Recursions: the unique layer indices applied (before, as the shared stack, after) the
        recursions; without `num_recursions` every layer comes once, before."""
        layers = list(range(self.num_hidden_layers))
        if self.num_recursions < 2:
            return layers, [], []
        if self.recursion_sharing == "cycle":
            return [], layers, []
        return layers[:1], layers[1:-1], layers[-1:]

    @property
    def unrolled_num_layers(self) -> int:
        """Layer applications from embedding to head at full depth: num_hidden_layers, or with recursions the
        unique layers plus the shared stack's N_r - 1 repeats."""
        first, shared, last = self.recursion_layout()
        return len(first) + max(self.num_recursions, 1) * len(shared) + len(last)

    def _validate_mamba(self) -> None:
        """The Mamba-2 fields, and the combinations with mamba layers that hfllm refuses."""
        inner = self.mamba_expand * self.hidden_size
        for field in ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_n_heads", "mamba_d_head",
                      "mamba_n_groups", "mamba_chunk_size"):
            self._check(getattr(self, field) >= 1, f"{field} ({getattr(self, field)}) must be a positive integer")
        self._check(
            self.mamba_n_heads * self.mamba_d_head == inner,
            f"mamba_n_heads * mamba_d_head ({self.mamba_n_heads} * {self.mamba_d_head}) must equal mamba_expand * "
            f"hidden_size ({inner})",
        )
        self._check(
            self.mamba_n_heads % self.mamba_n_groups == 0,
            f"mamba_n_heads ({self.mamba_n_heads}) must be divisible by mamba_n_groups ({self.mamba_n_groups})",
        )
        self._check(
            any(kind != MAMBA for kind in self.layer_types),
            "layer_types has only 'mamba' layers; a hybrid needs at least one attention layer (transformers' cache "
            "reads the sequence length from attention layers)",
        )
        for field, used in (("position_embedding: alibi", self.position_embedding == "alibi"),
                            ("value_embeddings", self.value_embeddings > 0)):
            self._check(not used, f"layer_types with 'mamba' layers does not support {field} (untested together); "
                                  "use rope or none positions, and no value embeddings")

    @property
    def has_mamba_layers(self) -> bool:
        return MAMBA in (self.layer_types or ())

    def _validate_mixture_of_depths(self) -> None:
        self._check(0 < self.mod_capacity <= 1,
                    f"mod_capacity ({self.mod_capacity}) must be in (0, 1], or null to disable it")
        layers = self.mod_routed_layers
        bad_layers = [i for i in layers if not 0 <= i < self.num_hidden_layers]
        self._check(not bad_layers, f"mod_layers {bad_layers} out of range 0..{self.num_hidden_layers - 1}")
        self._check(len(layers) > 0,
                    "mod_capacity needs at least one routed layer in mod_layers (2+ layers for the default)")
        self._check(len(set(layers)) == len(layers), f"mod_layers {layers} has repeated entries")
        self._check(self.mod_predictor_loss_coef >= 0,
                    f"mod_predictor_loss_coef ({self.mod_predictor_loss_coef}) must be 0 or more")
        unsupported = [field for field, used in (
            ("num_experts", self.num_experts > 0), ("sliding_window", "sliding_attention" in self.layer_types),
            ("position_embedding: alibi", self.position_embedding == "alibi"),
            ("value_embeddings", self.value_embeddings), ("unet_skips", self.unet_skips),
            ("num_recursions", self.num_recursions > 1), ("layer_types: mamba", MAMBA in self.layer_types)) if used]
        self._check(not unsupported, f"mod_capacity (Mixture of Depths) does not support {', '.join(unsupported)}; "
                                     "it routes dense, full-attention RoPE or NoPE layers")

    @property
    def mod_routed_layers(self) -> list[int]:
        """The layers Mixture of Depths routes: `mod_layers`, by default every other layer; none without
        mod_capacity."""
        if self.mod_capacity is None:
            return []
        return list(range(1, self.num_hidden_layers, 2)) if self.mod_layers is None else list(self.mod_layers)

    def is_mod_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` is routed by Mixture of Depths."""
        return layer_idx in self.mod_routed_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.num_experts > 0 and layer_idx not in self.mlp_only_layers

    @property
    def value_embedding_tables(self) -> int:
        """How many value-embedding tables the model builds: `value_embeddings`, at most one per layer."""
        return min(self.value_embeddings, self.num_hidden_layers)

    def value_embedding_index(self, layer_idx: int) -> int | None:
        """The value-embedding table layer `layer_idx` mixes in: table i serves the first layers (i) and the last
        ones (L - N + i), as modded-nanogpt shares its tables between the two ends of the stack; None for no table."""
        count, layers = self.value_embedding_tables, self.num_hidden_layers
        if layer_idx < count:
            return layer_idx
        if layer_idx >= layers - count:
            return layer_idx - (layers - count)
        return None


__all__ = ["HfllmConfig", "HfllmConfigError", "MAMBA"]
