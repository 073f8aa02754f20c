"""`vllm` backend: one vLLM engine for the whole search; each candidate merged inside the engine.

For a search (`for_candidates`) the engine starts once, with dummy weights, from a
directory holding the merged model's config and tokenizer, in the study's dtype.
Its workers load the source models once (`vllm_worker.MergeExtension`); for each
candidate the driver sends the recipe's YAML text and seed through
`LLM.collective_rpc`, every worker builds the merged tensors itself and loads them,
and the prefix cache is reset so no KV computed with old weights is reused. Only
plain data crosses the process boundary, as vLLM's default multiprocess mode
requires, and it works the same under tensor parallelism. For a checkpoint on disk
(`for_directory`, `mergetune eval --backend vllm`) the engine just loads it.
Log-likelihoods come from prompt logprobs, with requests truncated as lm-eval's
own vLLM model truncates them. On vLLM 0.34 or later, with `shared_prefix` (the
default), each request asks only for its continuation's rows
(`prompt_logprob_start`) and may read the prefix cache before them, so a context
shared by several answer choices can be prefilled once; vLLM bounds every cache
hit by that first scored row, so the scored rows are always computed.

Needs `pip install 'mergetune[vllm]'` and a GPU vLLM supports; vLLM is imported
only when an engine is started.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

from lm_eval.models.utils import has_bos_prefix
from packaging.version import Version
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mergetune.errors import MergetuneError
from mergetune.eval.backends.base import Backend
from mergetune.eval.lm_eval_adapter import TokenBatchItem, TokenScoringLM

if TYPE_CHECKING:
    from mergetune.merge_ops.recipe import Recipe, RecipeFile

log = logging.getLogger(__name__)

WORKER_EXTENSION = "mergetune.eval.backends.vllm_worker.MergeExtension"
# The first vLLM whose prompt log-probabilities start at a given row and whose prefix-cache hits stop there
# (`SamplingParams.prompt_logprob_start` with `prompt_logprobs`; `Request.get_prefix_cache_hit_limit`);
# its pre-releases and dev builds are not trusted with it.
PREFIX_SCORING_VERSION = Version("0.34.0")
# The vLLM releases (major, minor) whose source this backend was written against (read, not run: no GPU here);
# weight loading changed between these two (0.33 refuses a tied model's lm_head loaded alone), so another is said.
CHECKED_VERSIONS = ((0, 33), (0, 34))
# The engine's first requests are scored with and without the prefix cache; agreement within this many nats per
# continuation token (kernels differ with the batch) keeps the cache.
CHECKED_REQUESTS = 16
CHECK_TOLERANCE = 0.05


def import_vllm() -> Any:
    """The vllm module, or a MergetuneError that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise MergetuneError(
            "the vllm backend needs vLLM, which is not installed: pip install 'mergetune[vllm]' "
            "(on a machine with a GPU that vLLM supports)"
        ) from error
    warn_if_unchecked(Version(vllm.__version__))
    return vllm


def warn_if_unchecked(installed: Version) -> None:
    """A log line where the installed vLLM is not one this backend was written against."""
    low, high = CHECKED_VERSIONS
    if not low <= installed.release[:2] <= high:
        log.warning(
            "vLLM %s is outside the versions mergetune's vllm backend was written against (%s – %s): its weight "
            "loading and prompt log-probabilities may differ; compare a study's first trials with the hf backend",
            installed, ".".join(map(str, low)), ".".join(map(str, high)),
        )


def scores_from_prefix_cache(vllm: Any) -> bool:
    """Whether this vLLM can score continuations while reading their shared context from its prefix cache.

    Before 0.34 a request that asks for prompt log-probabilities never reads the
    cache, and `prompt_logprob_start` needs the V2 model runner and token-id rows
    without the argmax lm-eval's greedy check reads (docs/eval.md).
    """
    return Version(vllm.__version__) >= PREFIX_SCORING_VERSION


class _VLLMLM(TokenScoringLM):
    """lm-eval LM over a vLLM engine: HF tokenization, log-likelihoods from prompt logprobs."""

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase, max_length: int, prefix_cache: bool) -> None:
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix_cache = prefix_cache
        self._cache_checked = False
        self.forward_seconds = 0.0

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As lm-eval's vllm model: the tokenizer's own special-token default unless told otherwise, and none
        added to a text that already starts with the BOS token (no double BOS)."""
        if not string:
            return []
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        return self.tokenizer.encode(string, **options)

    def score_tokens(self, requests: Sequence[TokenBatchItem]) -> list[tuple[float, bool]]:
        # Left-truncated as lm-eval's vLLM model does: vLLM wants room for one generated token.
        window = self.max_length - 1
        sequences = [(list(context) + list(continuation))[-window:] for _, context, continuation in requests]
        # A continuation longer than the window is scored on the tokens that fit after the first one.
        continuations = [list(continuation)[-(len(tokens) - 1) :] for (_, _, continuation), tokens in zip(requests, sequences)]
        results = self._score(sequences, continuations, self.prefix_cache)
        if self.prefix_cache and not self._cache_checked:
            self._cache_checked = True
            results = self._check_cache(sequences, continuations, results)
        return results

    def _check_cache(
        self, sequences: list[list[int]], continuations: list[list[int]], cached: list[tuple[float, bool]]
    ) -> list[tuple[float, bool]]:
        """The engine's first requests scored again in full: where the cached scores disagree, the cache is
        dropped for good and every request scored in full, with a warning.

        A guard on a path run here only against a stand-in engine: a wrong row or a
        stale block gives gaps of whole nats, kernel differences hundredths.
        """
        count = min(CHECKED_REQUESTS, len(sequences))
        plain = self._score(sequences[:count], continuations[:count], cache=False)
        gap = max(
            abs(a - b) / max(1, len(continuation))
            for (a, _), (b, _), continuation in zip(cached, plain, continuations, strict=False)
        )
        if gap <= CHECK_TOLERANCE:
            log.info("vLLM prefix-cache scores agree with full scoring on %d requests (%.2g nats per token)", count, gap)
            return cached
        log.warning(
            "vLLM's prefix-cache scores differ from full scoring by %.2f nats per token on its first %d requests: "
            "every request is scored in full from now on (as evaluation.shared_prefix: false)", gap, count,
        )
        self.prefix_cache = False
        return plain + self._score(sequences[count:], continuations[count:], cache=False)

    def _score(self, sequences: list[list[int]], continuations: list[list[int]], cache: bool) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each sequence's continuation, its last tokens, from prompt logprobs."""
        if not sequences:
            return []
        vllm = import_vllm()
        from vllm.inputs import TokensPrompt

        plain = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        if cache:
            # Rows before the one predicting the first continuation token are not needed: they may come from
            # the prefix cache (vLLM caps its hits there) and come back as None. An empty continuation reads no
            # row, and vLLM refuses a start at the last one: it goes as a plain request.
            params = [
                vllm.SamplingParams(
                    max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False,
                    prompt_logprob_start=max(0, len(tokens) - len(continuation) - 1), skip_reading_prefix_cache=False,
                )
                if continuation
                else plain
                for tokens, continuation in zip(sequences, continuations, strict=True)
            ]
        else:
            params = plain
        start = perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        self.forward_seconds += perf_counter() - start
        results = []
        for continuation, tokens, output in zip(continuations, sequences, outputs, strict=True):
            total, greedy = 0.0, True
            for position in range(len(tokens) - len(continuation), len(tokens)):
                candidates = output.prompt_logprobs[position]
                chosen = candidates[tokens[position]].logprob
                total += chosen
                greedy = greedy and chosen >= max(entry.logprob for entry in candidates.values())
            results.append((total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("mergetune's vLLM backend scores loglikelihood requests only")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("mergetune's vLLM backend scores loglikelihood requests only")


class VLLMBackend(Backend):
    """Scores with a vLLM engine: a checkpoint's, or the candidates its workers merge (`build`)."""

    name = "vllm"
    command_options = ("tensor_parallel_size", "dtype", "shared_prefix")
    device_type = "cuda"  # where its workers build candidates

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase, prefix_cache: bool) -> None:
        super().__init__()
        self.llm = llm
        self.lm = _VLLMLM(llm, tokenizer, llm.llm_engine.model_config.max_model_len, prefix_cache)
        self._engine_parameters: set[str] | None = None

    @classmethod
    def for_directory(cls, model_dir: str | Path, **options: Any) -> VLLMBackend:
        return cls.launch(model_dir, **options)

    @classmethod
    def for_candidates(cls, skeleton_dir: str | Path, sources: list[str], dtype: str, **options: Any) -> VLLMBackend:
        """An engine whose workers hold `sources` and merge each candidate `build` is given.

        `skeleton_dir` holds the merged model's config.json and tokenizer (no weights:
        the engine starts with dummy ones); `dtype` is the study's.
        """
        backend = cls.launch(skeleton_dir, dtype=dtype, load_format="dummy", **options)
        counts = backend.llm.collective_rpc("mergetune_load_sources", args=(list(sources), dtype))
        log.info("%d vLLM worker(s) hold %d source model(s) each", len(counts), counts[0])
        return backend

    @classmethod
    def launch(
        cls,
        model_dir: str | Path,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        seed: int = 0,
        shared_prefix: bool = True,
        **engine_options: Any,
    ) -> VLLMBackend:
        """Start the engine once from `model_dir`.

        Prefix caching is on only where prompt-logprob requests can read it
        (`scores_from_prefix_cache`) and `shared_prefix` asks for it; `build` drops
        the cache, so keys computed with one candidate's weights never serve the next.
        """
        model_dir = Path(model_dir)  # a checkpoint `check_directory` passed, or a skeleton `for_candidates` wrote
        vllm = import_vllm()
        prefix_cache = shared_prefix and scores_from_prefix_cache(vllm)
        if shared_prefix and not prefix_cache:
            log.info("vLLM %s scores every request in full (shared prefixes need vLLM 0.34 or later)", vllm.__version__)
        llm = vllm.LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=prefix_cache,
            worker_extension_cls=WORKER_EXTENSION,
            **engine_options,
        )
        return cls(llm, AutoTokenizer.from_pretrained(model_dir), prefix_cache)

    @property
    def forward_seconds(self) -> float:
        return self.lm.forward_seconds

    def build(self, recipe: Recipe | RecipeFile, seed: int | None = None) -> None:
        """Merge `recipe` on every worker into the engine's weights; every parameter must be replaced."""
        if self._engine_parameters is None:
            self._engine_parameters = set(self.llm.collective_rpc("mergetune_parameter_names")[0])
        for worker, loaded in enumerate(self.llm.collective_rpc("mergetune_build", args=(recipe.to_yaml(), seed))):
            kept = sorted(self._engine_parameters - set(loaded))
            if kept:
                raise MergetuneError(
                    f"vLLM worker {worker} kept the previous weights of {len(kept)} parameter(s), e.g. {kept[0]}: "
                    "the recipe does not produce them"
                )
        if not self.llm.reset_prefix_cache() and self.lm.prefix_cache:  # without the cache nothing reads it
            raise MergetuneError(
                "vLLM could not drop its prefix cache (some blocks are still in use): "
                "the previous candidate's keys could be reused, so this candidate is not scored"
            )

    def describe(self) -> dict[str, Any]:
        config = self.llm.llm_engine.model_config
        return {
            "backend": self.name, "model": str(config.model), "dtype": str(config.dtype).removeprefix("torch."),
            "shared_prefix": self.lm.prefix_cache,
        }
