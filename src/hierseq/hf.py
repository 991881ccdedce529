"""Hugging Face ``transformers`` integration: every hierseq causal LM as an ``AutoModelForCausalLM``.

Importing this module (it needs the optional ``hf`` extra; ``import hierseq`` never imports it) creates,
for each registered causal LM ``<name>``:

* ``Hierseq<Name>Config``: a ``PreTrainedConfig`` with ``model_type = "hierseq-<name>"`` whose fields
  are exactly the native config's fields (same names, same defaults, validated by the native rules);
* ``Hierseq<Name>ForCausalLM``: a ``PreTrainedModel`` + ``GenerationMixin`` that *holds* the native
  model as ``.model``. The native module is the single source of truth for weights and forward; the
  wrapper only translates calling conventions,

and registers both with ``AutoConfig`` / ``AutoModelForCausalLM``. So, with ``import hierseq.hf``::

    model = hierseq.hf.from_native("runs/my_model")        # a hierseq.save directory
    model.save_pretrained("hf_model")                       # config.json + model.safetensors (+ tokenizer)
    model = AutoModelForCausalLM.from_pretrained("hf_model")
    tokenizer = AutoTokenizer.from_pretrained("hf_model")   # a model trained with a subword tokenizer
    out = model.generate(ids, max_new_tokens=32, do_sample=True, top_p=0.9)

A model trained with a subword tokenizer carries it (``model.model.tokenizer``): ``save_pretrained`` writes it
beside the weights as ``tokenizer.json`` + ``tokenizer_config.json``, which ``AutoTokenizer`` reads.

Conventions that differ from the native API, on purpose, to match what transformers users expect:

* ``labels`` follow the transformers convention (unshifted, usually ``labels = input_ids``); the
  wrapper shifts them once into the native "already aligned next-token targets" form.
* The decoding state is the native cache, wrapped in :class:`HierseqCache` and carried by
  ``generate()`` in the ``cache`` slot: a KV cache for attention models, the recurrent state for
  recurrent ones. After the prefill the model only ever sees the newest token.
* Padding. No hierseq model masks tokens inside its forward pass (a recurrent scan or a chunked
  hierarchy would absorb left pads into its state), so ``forward`` refuses an ``attention_mask`` with
  zeros. ``generate()`` accepts a left-padded batch and decodes each group of equal-length prompts
  as its own batch (exactly what ``hierseq.generate`` does with ragged prompts): greedy results are
  identical to unpadded single-row runs. Sampling draws from the same distributions, but the random
  stream is consumed group by group, so sampled tokens of a padded batch differ from an unpadded run.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import BaseConfig
from .data.tokenizer import attach_tokenizer, load_saved_tokenizer
from .registry import get_entry, list_models
from .serialization import MODEL_TYPE_PREFIX, remove_stale_tokenizer_files, write_tokenizer_files
from .serialization import load as load_native

__all__ = [
    "MODEL_TYPE_PREFIX",
    "HierseqCache",
    "HierseqCausalLMOutput",
    "HierseqConfig",
    "HierseqForCausalLM",
    "config_class_for",
    "from_native",
    "model_class_for",
    "register_all",
    "wrap",
]


# ========================================================================================== cache
class HierseqCache:
    """The decoding state ``generate()`` carries between steps: the native model's own cache object.

    hierseq caches are model-specific Python objects (per-layer KV buffers, recurrent states, tree
    summaries ...), so instead of translating them into transformers' layer-wise ``Cache`` we pass the
    native object through untouched and expose the few attributes generation asks of a cache.

    Attributes:
        native: the object the native model returned as ``CausalLMOutput.cache``.
        length: number of tokens the state has absorbed.
    """

    # Read by transformers' generation: the native state cannot be compiled into a static buffer,
    # cannot be cropped back to an earlier length (so no assisted decoding), and is not a
    # layer-by-layer "linear" cache, so restarting from it slices the prompt by ``get_seq_length``.
    is_compileable = False
    is_croppable = False
    is_linear = (False,)

    def __init__(self, native: Any, length: int) -> None:
        self.native = native
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (transformers' name for it)."""
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select / reorder batch rows in place (beam search); every native cache has ``reorder``."""
        self.native.reorder(beam_idx)

    def __repr__(self) -> str:
        return f"HierseqCache(native={type(self.native).__name__}, length={self.length})"


# ========================================================================================== output
@dataclasses.dataclass
class HierseqCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the native loss parts.

    ``loss`` is the native total (LM loss + weighted auxiliary loss); ``lm_loss`` is the LM part alone
    and ``aux_loss`` the unweighted auxiliary loss (0 for models without one). ``cache`` is a
    :class:`HierseqCache` when ``use_cache=True``.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


# ========================================================================================== config
class HierseqConfig(PreTrainedConfig):
    """Base of the per-model configs. Subclasses (made by :func:`register_all`) add the native config's
    fields as dataclass fields, so ``config.json`` holds every native field by its native name.

    ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` are the transformers generation defaults
    (hierseq's byte-level models have no special tokens, so all default to None).
    """

    model_type: ClassVar[str] = "hierseq"
    #: registry name of the wrapped native model ("" on this abstract base).
    hierseq_name: ClassVar[str] = ""
    #: the native config dataclass.
    native_config_class: ClassVar[type[BaseConfig] | None] = None
    #: native names behind transformers' standard attribute names, where the native model has them.
    attribute_map: ClassVar[dict[str, str]] = {}

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.native_config_class is not None:
            self.to_native()  # validate now, with the native rules and error messages

    @property
    def tie_word_embeddings(self) -> bool:
        """Always True: the wrapper declares exactly the parameters the native model shares (found on the
        instance), so there is nothing to tie when the native config unties them."""
        return True

    def native_dict(self) -> dict[str, Any]:
        """The native fields and their values."""
        if self.native_config_class is None:
            raise TypeError("HierseqConfig is abstract: use a per-model subclass (see hierseq.hf.config_class_for)")
        return {name: getattr(self, name) for name in self.native_config_class.field_names()}

    def to_native(self) -> BaseConfig:
        """The equivalent native config (validated; JSON lists turned back into tuples)."""
        return self.native_config_class.from_dict(self.native_dict())

    @classmethod
    def from_native(cls, native: BaseConfig, **hf_kwargs: Any) -> HierseqConfig:
        """The transformers config for ``native`` (a config of this class's model); ``hf_kwargs`` set
        transformers-only fields such as ``eos_token_id``."""
        if cls.native_config_class is None or not isinstance(native, cls.native_config_class):
            raise ValueError(
                f"native={type(native).__name__}: {cls.__name__} maps "
                f"{getattr(cls.native_config_class, '__name__', None)}"
            )
        fields = {f.name: getattr(native, f.name) for f in dataclasses.fields(native)}
        return cls(**fields, **hf_kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        """transformers' loader, taught to read a native ``hierseq.save`` config.json as well. Native
        directories name their model ``hierseq-<name>`` like these configs do (so ``AutoConfig`` finds
        them); those of older hierseq versions hold the bare registry name, translated here."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if cls.hierseq_name and config_dict.get("model_type") == cls.hierseq_name:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs


# ========================================================================================== model
class HierseqForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers face of a native hierseq causal LM (held as ``self.model``).

    Made per model by :func:`register_all`; build one with ``Hierseq<Name>ForCausalLM(config)``
    (fresh native init), :func:`wrap` (an existing native model, weights shared) or
    ``from_pretrained``.
    """

    config_class = HierseqConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # Native caches cannot be rolled back, which assisted / speculative decoding needs.
    _is_stateful = True
    # Beam search works through HierseqCache.reorder_cache; contrastive search and DoLa need hidden
    # states, which the native contract does not return.
    _supported_generation_modes = (
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
    )

    def __init__(self, config: HierseqConfig, native_model: nn.Module | None = None) -> None:
        super().__init__(config)
        entry = get_entry(config.hierseq_name)
        if native_model is None:
            native_model = entry.model_cls(config.to_native())
        elif not isinstance(native_model, entry.model_cls):
            raise ValueError(
                f"native_model={type(native_model).__name__}: {type(self).__name__} wraps {entry.model_cls.__name__}"
            )
        self.model = native_model
        # Declared on the instance because which parameters are shared depends on the native config
        # (e.g. tie_embeddings) and on where each model keeps its embedding; identity of the Parameter
        # objects finds them even on the meta device, where every data pointer is 0.
        self._tied_weights_keys = _shared_parameter_map(self)
        # Buffers the native constructor computes (rotary frequencies ...) are not in the checkpoint;
        # keep their values to restore them after transformers' loading replaced them (see from_pretrained).
        self._computed_buffers = _snapshot_non_persistent_buffers(self)
        self.post_init()

    # ------------------------------------------------------------------ weights
    @classmethod
    def get_init_context(cls, dtype: torch.dtype, is_quantized: bool, *args: Any, **kwargs: Any) -> list:
        """Build the native model on a real device, never on ``meta``: native constructors compute
        buffers (rotary frequencies) that a meta build would leave without values."""
        contexts = super().get_init_context(dtype, is_quantized, *args, **kwargs)
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]

    def _init_weights(self, module: nn.Module) -> None:
        """Deliberately nothing: the native constructor already initialised every parameter with the
        native scheme, which transformers' generic init must not overwrite. (Weights missing from a
        checkpoint therefore keep their native initialisation.)"""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> HierseqForCausalLM:
        """transformers' ``from_pretrained``, then the native constructor's computed buffers (left out of
        the checkpoint, replaced by placeholders during loading) are put back, and a local directory's saved
        tokenizer is given to the native model (so ``save_pretrained`` and ``hierseq.save`` write it again)."""
        model = super().from_pretrained(*args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model  # a tuple with output_loading_info=True
        loaded._restore_computed_buffers()
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            tokenizer = load_saved_tokenizer(Path(source), loaded.config.vocab_size)
            if tokenizer is not None:
                attach_tokenizer(loaded.model, tokenizer)
        return model

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, plus the native model's tokenizer (``tokenizer.json`` and the
        ``tokenizer_config.json`` ``AutoTokenizer`` reads), when it carries a subword one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and not write_tokenizer_files(self.model, Path(save_directory)):
            remove_stale_tokenizer_files(Path(save_directory))  # as hierseq.save does

    def _restore_computed_buffers(self) -> None:
        for name, value in self._computed_buffers.items():
            owner, _, attr = name.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            setattr(module, attr, value.to(device=getattr(module, attr).device))

    @property
    def native_model(self) -> nn.Module:
        """The native hierseq model this wrapper holds (``hierseq.save(wrapper, dir)`` saves it)."""
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        """The native token embedding (the first ``nn.Embedding`` over the vocabulary)."""
        for module in self.model.modules():
            if isinstance(module, nn.Embedding) and module.num_embeddings == self.config.vocab_size:
                return module
        raise AttributeError(f"{type(self.model).__name__}: no token embedding found")

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self.model, "lm_head", None)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: HierseqCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> HierseqCausalLMOutput | tuple:
        """Run the native model.

        Args:
            input_ids: [B, L] token ids. With a ``cache``, only the tokens after the cached ones.
            attention_mask: accepted for transformers compatibility; must be all ones (or None), since
                hierseq models do not mask padding (``generate()`` handles left padding itself).
            cache: a :class:`HierseqCache` from a previous call (``past_key_values`` also accepted).
            labels: [B, L] transformers-style targets (``labels = input_ids``; the model shifts them;
                -100 is ignored).
            use_cache: return the decoding state as ``cache`` (default False, as the native API).
            return_dict: False returns a tuple like every transformers model.

        Returns:
            :class:`HierseqCausalLMOutput` (logits [B, L, V], loss, lm_loss, aux_loss, cache).
        """
        cache = _pop_cache_alias(cache, kwargs)
        _check_unsupported_kwargs(kwargs)
        if input_ids is None:
            raise ValueError("input_ids: required (hierseq models take token ids, not inputs_embeds)")
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ValueError(
                "attention_mask: contains padding (zeros), but hierseq models have no padding mask in their "
                "forward pass; strip the padding, or use generate(), which decodes left-padded batches by "
                "grouping prompts of equal length"
            )
        if cache is not None and not isinstance(cache, HierseqCache):
            raise TypeError(f"cache: expected a HierseqCache from a previous call, got {type(cache).__name__}")
        use_cache = bool(use_cache)

        native_labels = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels: shape={shape}: must match input_ids shape {tuple(input_ids.shape)}")
            # transformers' labels are the inputs themselves; the native contract wants the target of
            # position t at position t, so shift left once and ignore the last position.
            native_labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)

        out = self.model(
            input_ids,
            labels=native_labels,
            cache=cache.native if cache is not None else None,
            use_cache=use_cache,
        )
        new_cache = None
        if use_cache:
            seen = cache.length if cache is not None else 0
            if cache is not None:
                # Reuse the wrapper: generate() keeps one object for the whole decoding.
                cache.native, cache.length = out.cache, seen + input_ids.shape[1]
                new_cache = cache
            else:
                new_cache = HierseqCache(out.cache, input_ids.shape[1])
        output = HierseqCausalLMOutput(
            loss=out.loss, logits=out.logits, cache=new_cache, lm_loss=out.lm_loss, aux_loss=out.aux_loss
        )
        if return_dict is False:
            return output.to_tuple()
        return output

    # ------------------------------------------------------------------ generation
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The cache is the native object our forward returns; a transformers DynamicCache would be
        # passed in on the first call and mean nothing to the native model.
        return False

    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
        """``GenerationMixin.generate`` with left-padding support for every hierseq model.

        Without padding (no ``attention_mask``, or all ones) this is transformers' ``generate``,
        decoding incrementally through the native cache. With a left-padded batch, rows are grouped by
        prompt length, each group is generated on its own without its pads, and the results are
        reassembled as transformers lays them out: ``[pads + prompt + new tokens + right padding]``
        (right padding with ``pad_token_id``, else ``eos_token_id``, else 0, where groups stopped
        early). Grouped generation returns a tensor only (no streamer, no ``return_dict_in_generate``).
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return super().generate(input_ids, generation_config, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            # An explicit mask: otherwise transformers infers padding from pad_token_id, which with
            # byte-level vocabularies would mistake real bytes for padding.
            attention_mask = torch.ones_like(input_ids)
        lengths = _left_padded_lengths(input_ids, attention_mask)
        full = input_ids.shape[1]
        if bool((lengths == full).all()):
            return super().generate(input_ids, generation_config, attention_mask=attention_mask, **kwargs)
        return self._generate_grouped(input_ids, lengths, generation_config, kwargs)

    def _generate_grouped(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        generation_config: Any,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Generate each group of equal prompt length separately; see :meth:`generate`."""
        base = generation_config if generation_config is not None else self.generation_config

        def setting(key: str) -> Any:
            return kwargs.get(key, getattr(base, key, None))

        if kwargs.get("streamer") is not None or setting("return_dict_in_generate"):
            raise ValueError(
                "generate(): a left-padded batch is decoded group by group, which supports neither a streamer "
                "nor return_dict_in_generate; pass prompts of equal length (or one at a time) for those"
            )
        full = input_ids.shape[1]
        # max_length / min_length count the padded prompt; each group's prompt is shorter, so turn them
        # into the number of new tokens they mean for the padded batch.
        kwargs = dict(kwargs)
        if setting("max_new_tokens") is None:
            kwargs["max_new_tokens"] = int(setting("max_length") or 20) - full
            kwargs.pop("max_length", None)
        if setting("min_new_tokens") is None and (setting("min_length") or 0) > full:
            kwargs["min_new_tokens"] = int(setting("min_length")) - full
        kwargs["min_length"] = 0
        n_return = int(setting("num_return_sequences") or 1)
        pad_id = _first_token_id(setting("pad_token_id"), setting("eos_token_id"))

        pieces: dict[int, torch.Tensor] = {}  # original row -> its [n_return, T] new tokens
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero().flatten()
            prompts = input_ids[rows, full - length :]
            out = super().generate(
                prompts, generation_config, attention_mask=torch.ones_like(prompts), **kwargs
            )  # [len(rows) * n_return, length + T]; the sequences of one prompt are adjacent
            new = out[:, length:].view(len(rows), n_return, -1)
            for i, row in enumerate(rows.tolist()):
                pieces[row] = new[i]
        width = max(p.shape[1] for p in pieces.values())
        result = input_ids.new_full((input_ids.shape[0] * n_return, full + width), pad_id)
        for row, new in pieces.items():
            span = slice(row * n_return, (row + 1) * n_return)
            result[span, :full] = input_ids[row]
            result[span, full : full + new.shape[1]] = new
        return result


# ========================================================================================== helpers
_BENIGN_KWARGS = ("output_attentions", "output_hidden_states")


def _pop_cache_alias(cache: Any, kwargs: dict[str, Any]) -> Any:
    """Accept transformers' older name ``past_key_values`` for ``cache``."""
    alias = kwargs.pop("past_key_values", None)
    if alias is not None:
        if cache is not None:
            raise ValueError("cache / past_key_values: pass only one of them")
        return alias
    return cache


def _check_unsupported_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse inputs the native contract cannot honour instead of silently ignoring them."""
    for key, value in kwargs.items():
        if value is None or value is False:
            continue
        if key in _BENIGN_KWARGS:
            raise NotImplementedError(f"{key}=True: hierseq models do not return attentions or hidden states")
        raise TypeError(
            f"{key}: not an input of hierseq causal LMs (input_ids, attention_mask, cache, labels, use_cache)"
        )


def _left_padded_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Prompt lengths [B] of a left-padded batch; raise unless every row is ``0 ... 0 1 ... 1``."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: shape={tuple(attention_mask.shape)}: must match input_ids {tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(torch.long)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask: values must be 0 (padding) or 1 (token)")
    lengths = mask.sum(dim=1)
    positions = torch.arange(input_ids.shape[1], device=mask.device)
    expected = (positions[None, :] >= input_ids.shape[1] - lengths[:, None]).to(torch.long)
    if not torch.equal(mask, expected):
        raise ValueError(
            "attention_mask: only left padding is supported (each row: zeros, then ones); "
            "use padding_side='left' in the tokenizer"
        )
    if bool((lengths == 0).any()):
        raise ValueError("attention_mask: a row is all padding; every prompt needs at least one token")
    return lengths


def _first_token_id(*candidates: Any) -> int:
    """The first usable token id among ``candidates`` (ints or lists of ints), else 0."""
    for value in candidates:
        if isinstance(value, torch.Tensor):
            value = value.flatten().tolist()
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _shared_parameter_map(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for every parameter reachable under several names (tied weights)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _snapshot_non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers left out of the state dict, unless they are on ``meta`` (no values)."""
    persistent = set(model.state_dict(keep_vars=True))
    return {
        name: buf.detach().clone()
        for name, buf in model.named_buffers()
        if name not in persistent and buf.device.type != "meta"
    }


def _camel(name: str) -> str:
    """Registry name -> class-name stem: ``linear_attn`` -> ``LinearAttn``."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", name) if part)


# ========================================================================================== registration
_CONFIG_CLASSES: dict[str, type[HierseqConfig]] = {}
_MODEL_CLASSES: dict[str, type[HierseqForCausalLM]] = {}
# transformers' standard names -> the shared hierseq config names (DESIGN.md contract).
_STANDARD_ATTRIBUTES = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}


def _make_config_class(name: str, native_cls: type[BaseConfig]) -> type[HierseqConfig]:
    """A ``HierseqConfig`` subclass whose dataclass fields mirror ``native_cls``'s fields."""
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": f"Hierseq{_camel(name)}Config",
        "__doc__": f"transformers config of the hierseq {name!r} model; fields as in {native_cls.__name__}.",
        "model_type": MODEL_TYPE_PREFIX + name,
        "hierseq_name": name,
        "native_config_class": native_cls,
    }
    reserved = {f.name for f in dataclasses.fields(HierseqConfig)} | set(dir(HierseqConfig))
    native_fields = dataclasses.fields(native_cls)
    for f in native_fields:
        if f.name in reserved:
            raise ValueError(
                f"{native_cls.__name__}.{f.name}: clashes with a transformers config attribute; rename the field"
            )
        annotations[f.name] = Any
        if f.default is not dataclasses.MISSING:
            namespace[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f.name] = dataclasses.field(default_factory=f.default_factory)
        else:
            raise ValueError(f"{native_cls.__name__}.{f.name}: native config fields need defaults")
    names = {f.name for f in native_fields}
    namespace["attribute_map"] = {hf: ours for hf, ours in _STANDARD_ATTRIBUTES.items() if ours in names}
    namespace["__annotations__"] = annotations
    # PreTrainedConfig.__init_subclass__ turns the new class into a keyword-only dataclass.
    return type(namespace["__qualname__"], (HierseqConfig,), namespace)


def _register(name: str) -> None:
    entry = get_entry(name)
    config_cls = _make_config_class(name, entry.config_cls)
    model_cls = type(
        f"Hierseq{_camel(name)}ForCausalLM",
        (HierseqForCausalLM,),
        {
            "__module__": __name__,
            "__qualname__": f"Hierseq{_camel(name)}ForCausalLM",
            "__doc__": f"transformers causal LM wrapping hierseq's {entry.model_cls.__name__} ({name!r}).",
            "config_class": config_cls,
        },
    )
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    # Importable by name (e.g. hierseq.hf.HierseqMambaForCausalLM), as transformers users expect.
    globals()[config_cls.__name__] = config_cls
    globals()[model_cls.__name__] = model_cls
    _CONFIG_CLASSES[name] = config_cls
    _MODEL_CLASSES[name] = model_cls


def register_all() -> list[str]:
    """Register every hierseq causal LM not registered yet (idempotent; runs on import, and again for
    models registered later). Returns the registered transformers ``model_type`` names."""
    for name in list_models(kind="causal_lm"):
        if name not in _MODEL_CLASSES:
            _register(name)
    return sorted(MODEL_TYPE_PREFIX + name for name in _MODEL_CLASSES)


def _lookup(name: str) -> str:
    """Accept ``mamba`` or ``hierseq-mamba``; raise a clear error for anything else."""
    bare = name[len(MODEL_TYPE_PREFIX) :] if name.startswith(MODEL_TYPE_PREFIX) else name
    if bare not in _MODEL_CLASSES:
        register_all()
    if bare not in _MODEL_CLASSES:
        raise ValueError(f"model={name!r}: not a hierseq causal LM; known: {sorted(_MODEL_CLASSES)}")
    return bare


def config_class_for(name: str) -> type[HierseqConfig]:
    """The transformers config class of hierseq model ``name``."""
    return _CONFIG_CLASSES[_lookup(name)]


def model_class_for(name: str) -> type[HierseqForCausalLM]:
    """The transformers causal-LM class of hierseq model ``name``."""
    return _MODEL_CLASSES[_lookup(name)]


def wrap(native_model: nn.Module, **hf_config_kwargs: Any) -> HierseqForCausalLM:
    """Wrap a native hierseq causal LM (sharing its parameters, no copy). ``hf_config_kwargs`` set
    transformers-only config fields such as ``eos_token_id``."""
    native_config = getattr(native_model, "config", None)
    name = getattr(native_config, "model_type", "")
    if not isinstance(native_config, BaseConfig) or not name:
        raise ValueError(f"native_model={type(native_model).__name__}: not a registered hierseq model")
    if get_entry(name).kind != "causal_lm":
        raise ValueError(
            f"native_model={name!r}: is a {get_entry(name).kind}, only causal LMs have a transformers face"
        )
    config = config_class_for(name).from_native(native_config, **hf_config_kwargs)
    return model_class_for(name)(config, native_model=native_model)


def from_native(directory: str | Path, **hf_config_kwargs: Any) -> HierseqForCausalLM:
    """Load a ``hierseq.save`` directory (or a ``save_pretrained`` one: ``hierseq.load`` reads both) as a
    transformers model; ``save_pretrained`` then writes it in the transformers layout."""
    return wrap(load_native(Path(directory)), **hf_config_kwargs)


register_all()
