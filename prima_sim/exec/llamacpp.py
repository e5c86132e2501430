"""Resource-owning wrappers around llama.cpp (through llama-cpp-python's raw ctypes bindings).

Stock llama.cpp cannot run "layers [a, b) of a model", so every window is its own GGUF shard (see
:mod:`prima_sim.exec.shard`) loaded as a model of its own. Three things make a window behave like a slice of
the whole model, bit for bit:

* **Input.** A window that starts mid-model takes the previous window's hidden states as an embedding batch
  (``llama_batch.embd``), with absolute positions; each window keeps its own KV cache in its own context.
* **Output.** llama.cpp applies the final norm before returning anything, so the residual stream is taken
  with the graph's eval callback: it asks only for ``l_out-<last local layer>``, copies it with
  ``ggml_backend_tensor_get``, and then answers ``False``, which makes the scheduler skip the rest of the
  split (the output norm and the vocabulary-free output head never run).
* **Embedding.** The head's 0-layer embedding shard runs on token ids; its graph is ``get_rows`` (plus the
  architecture's scaling) followed directly by the output norm. The callback copies the norm's input, the
  exact layer-0 input, when the norm is about to run, and stops there (the output head never runs).

Models are always loaded with ``use_extra_bufts = False`` and ``load_mode = MMAP``: weights stay file-backed
page cache (what prefetch and eviction rely on) and AMX repacking, which dies with SIGILL on some CPUs, is off.

Why one module of this size: every ctypes call into llama.cpp goes through it, so memory ownership and the binding's
version are reviewed in one place; ``Model``, ``Window``, ``Reference`` and ``Sampler`` share the runtime handle.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import mmap
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from prima_sim.errors import InputError, MissingDependencyError

if (
    TYPE_CHECKING
):  # numpy is imported where the head's API returns arrays: a worker imports none (docs/exec.md)
    import numpy as np

    from prima_sim.exec.stream import LayerStreamer

log = logging.getLogger(__name__)

LOAD_MODE_MMAP = 1
FLASH_ATTN_DISABLED = 0
FLASH_ATTN_ENABLED = 1
_flash_attn = False
"""With :func:`use_flash_attn` on (``--flash-attn``; ``run --local`` and ``serve --local`` pass the flag to their workers),
every context the process creates uses llama.cpp's flash attention. On the CPU its kernel computes each row's attention alone, so a row gives the same
logits in a batch of several rows as decoded alone (without it llama.cpp's batched attention rounds differently once
the KV cache passes a length): the rows of a speculative verification pass are then the single-token results."""


def use_flash_attn(on: bool) -> None:
    """Every llama.cpp context this process creates from now on uses flash attention (``on``) or not."""
    global _flash_attn
    _flash_attn = bool(on)


def flash_attn_enabled() -> bool:
    """Whether contexts created now use flash attention (:func:`use_flash_attn`)."""
    return _flash_attn


LOG_LEVEL_ERROR = 4  # GGML_LOG_LEVEL_ERROR: llama.cpp's chatter below this is dropped
_NORM_OPS = (b"RMS_NORM", b"NORM")


BINDINGS = "llama_cpp.llama_cpp"
"""llama-cpp-python's low-level ctypes bindings (a mirror of ``llama.h``): everything this module calls."""


def bindings() -> Any:
    """llama-cpp-python's low-level bindings (:data:`BINDINGS`), imported without running the package's
    ``__init__``, which also imports its high-level API (``Llama``, chat formats, jinja2): 3.3 MiB of every
    worker's anonymous memory that the executor never uses (measured: docs/exec.md, "Memory of the executor's
    processes"). The package module stands in ``sys.modules`` only while the bindings load; a later
    ``import llama_cpp`` runs the real package, which reuses the loaded bindings (one library, one module).

    Raises:
        MissingDependencyError: llama-cpp-python is not installed.
    """
    mod = sys.modules.get(BINDINGS)
    if mod is not None:
        return mod
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        spec = None
    if spec is None:  # expected on installs without the [real] extra
        raise MissingDependencyError("llama-cpp-python is not installed: pip install 'prima-sim[real]'")
    if "llama_cpp" in sys.modules or not spec.submodule_search_locations:
        return importlib.import_module(
            BINDINGS
        )  # the package is loaded already (or is not a package: let it say)
    pkg = importlib.util.module_from_spec(spec)  # the package without its __init__
    sys.modules["llama_cpp"] = pkg
    try:
        return importlib.import_module(BINDINGS)
    finally:
        if sys.modules.get("llama_cpp") is pkg:
            del sys.modules["llama_cpp"]


class GgmlTensor(ctypes.Structure):
    """Prefix of ``struct ggml_tensor`` (ggml 0.25): the fields the eval callback reads."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_NAME_OFFSET = GgmlTensor.name.offset
_OP_OFFSET = GgmlTensor.op.offset
_SRC0_OFFSET = GgmlTensor.src.offset


class _BuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override``: tensors whose name matches ``pattern`` go to ``buft``."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


REPACK_PATTERN = rb"^blk\.[0-9]+\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down|gate_up))\.weight$"
"""The tensors :class:`Model` puts in the repack buffer type: a layer's matrices (what its kernels multiply by; a
norm's vector or anything else there crashes the load), never the embedding table or the output head."""


class _Runtime:
    """The loaded libraries and the few ggml functions llama-cpp-python does not bind."""

    _instance: _Runtime | None = None

    def __init__(self) -> None:
        lc = bindings()
        self.lc = lc
        libdir = Path(lc.__file__).parent / "lib"
        self.ggml = ctypes.CDLL(str(libdir / "libggml-base.so"))
        self.ggml.ggml_backend_tensor_get.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
        ]
        self.ggml.ggml_backend_tensor_get.restype = None
        self.ggml.ggml_op_name.argtypes = [ctypes.c_int]
        self.ggml.ggml_op_name.restype = ctypes.c_char_p
        self.ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
        self.ggml.ggml_nbytes.restype = ctypes.c_size_t
        self.norm_ops = {i for i in range(128) if (self.ggml.ggml_op_name(i) or b"") in _NORM_OPS}
        self._repack: int | None = None
        self._repack_known = False  # looked up yet?
        self._log_cb = lc.llama_log_callback(_log_sink)
        lc.llama_log_set(self._log_cb, None)
        lc.llama_backend_init()

    @classmethod
    def get(cls) -> _Runtime:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def repack_buft(self) -> int | None:
        """The CPU backend's ``CPU_REPACK`` buffer type (weights re-laid out at load for its vector kernels), or
        None where this build has none. Looked up by name among the CPU device's extra buffer types, so that a
        model gets that one alone: ``use_extra_bufts`` would also turn on the AMX buffer type, whose kernels die
        with SIGILL on some of the machines this runs on (docs/exec.md)."""
        if self._repack_known:
            return self._repack
        self._repack_known = True
        try:
            reg_lib = ctypes.CDLL(str(Path(self.lc.__file__).parent / "lib" / "libggml.so"))
            reg_lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
            reg_lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
            g = self.ggml
            g.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
            g.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
            g.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            g.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
            g.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
            g.ggml_backend_buft_name.restype = ctypes.c_char_p
            dev = reg_lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
            reg = g.ggml_backend_dev_backend_reg(dev) if dev else None
            fp = (
                g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
            )
        except (OSError, AttributeError):
            return None
        if not fp:
            return None
        extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fp)(dev)
        i = 0
        while extra and extra[i]:
            if g.ggml_backend_buft_name(extra[i]) == b"CPU_REPACK":
                self._repack = int(extra[i])
                break
            i += 1
        return self._repack


def _log_sink(level: int, text: bytes, _user: Any) -> None:
    if level == LOG_LEVEL_ERROR and text:
        log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def load_runtime() -> None:
    """Load llama.cpp and initialise its backend (what the first :class:`Model` does; idempotent)."""
    _Runtime.get()


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build has a GPU backend (``llama_supports_gpu_offload``)."""
    return bool(_Runtime.get().lc.llama_supports_gpu_offload())


class Model:
    """A GGUF model (one shard) loaded with mmap and without repacked buffers.

    Args:
        path: the shard file.
        n_gpu_layers: how many of its last layers to offload to the GPU.
        vocab_only: load the vocabulary and hyperparameters only (no tensors: tokenizing, no decoding).
        repack: put the layers' matrices in the CPU backend's repack buffer type (:meth:`_Runtime.repack_buft`;
            ``repacked`` says whether it happened): about 1.5x faster decoding of Q4_0 on an AVX-512 CPU, but the
            weights then live in anonymous memory, not in the page cache, so only for weights that fit in memory
            for good. Not used by the ring yet (docs/peers.md); ``benchmarks/bench_repack.py`` measures it.

    Raises:
        InputError: llama.cpp could not load the file.
    """

    def __init__(
        self, path: str | Path, n_gpu_layers: int = 0, vocab_only: bool = False, repack: bool = False
    ) -> None:
        rt = _Runtime.get()
        self._lc = rt.lc
        self.ptr: Any = None  # llama_model *, None until loaded and after close()
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(str(path), "", "file not found")
        params = self._lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = False
        params.load_mode = LOAD_MODE_MMAP
        params.vocab_only = vocab_only
        # repack: the layers' matrices are copied at load into the CPU repack buffer type (anonymous memory, laid
        # out for the CPU's vector kernels; not page cache any more) where this build has it
        buft = rt.repack_buft() if repack and not vocab_only else None
        self.repacked = buft is not None
        if buft is not None:
            self._overrides = (_BuftOverride * 2)(
                _BuftOverride(REPACK_PATTERN, buft), _BuftOverride(None, None)
            )
            params.tensor_buft_overrides = ctypes.addressof(self._overrides)  # kept alive by self
        self.ptr = self._lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise InputError(str(path), "", "llama.cpp could not load this GGUF (see the log above)")
        self.vocab = self._lc.llama_model_get_vocab(self.ptr)
        self.n_embd = int(self._lc.llama_model_n_embd(self.ptr))
        self.n_layer = int(self._lc.llama_model_n_layer(self.ptr))
        self.n_vocab = int(self._lc.llama_vocab_n_tokens(self.vocab))

    def close(self) -> None:
        """Free the model."""
        if self.ptr:
            self._lc.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tokenizer ----------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` (with BOS when the model asks for it)."""
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (self._lc.llama_token * cap)()
        n = self._lc.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self._lc.llama_token * cap)()
            n = self._lc.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens rendered as empty)."""
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def meta(self, key: str) -> str | None:
        """The model's metadata value ``key`` as llama.cpp prints it, or None if the file has no such key."""
        buf = ctypes.create_string_buffer(256)
        n = self._lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    def chat_template(self) -> str:
        """The GGUF's chat template (``tokenizer.chat_template``), or "" when it has none."""
        tmpl = self._lc.llama_model_chat_template(self.ptr, None)
        return tmpl.decode("utf-8", "replace") if tmpl else ""

    def special_text(self, which: str) -> str:
        """The text of the ``"bos"`` or ``"eos"`` token ("" when the vocabulary has none)."""
        tok = int((self._lc.llama_vocab_bos if which == "bos" else self._lc.llama_vocab_eos)(self.vocab))
        if tok < 0:
            return ""
        text = self._lc.llama_vocab_get_text(self.vocab, tok)
        return text.decode("utf-8", "replace") if text else ""

    def chat_prompt(self, user_text: str) -> str:
        """``user_text`` as one user turn in the model's chat template, ending with the assistant's turn.

        Raises:
            InputError: the model has no chat template llama.cpp recognises.
        """
        tmpl = self._lc.llama_model_chat_template(self.ptr, None)
        if not tmpl:
            raise InputError(
                str(self.path), "tokenizer.chat_template", "the model has no chat template; drop --chat"
            )
        msgs = (self._lc.llama_chat_message * 1)(
            self._lc.llama_chat_message(b"user", user_text.encode("utf-8"))
        )
        size = 4 * len(user_text.encode("utf-8")) + 1024
        buf = ctypes.create_string_buffer(size)
        n = self._lc.llama_chat_apply_template(tmpl, msgs, 1, True, buf, size)
        if n < 0:
            raise InputError(
                str(self.path), "tokenizer.chat_template", "llama.cpp does not support this chat template"
            )
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = self._lc.llama_chat_apply_template(tmpl, msgs, 1, True, buf, n)
        return buf.raw[:n].decode("utf-8", "replace")


class Window:
    """One llama.cpp context over one shard, with its own KV cache, batch and output capture.

    ``mode`` says what the window returns: ``"hidden"`` (the residual stream after its last layer, for a
    window that feeds another), ``"embed"`` (the layer-0 input, for the 0-layer embedding shard) or
    ``"logits"`` (llama.cpp's logits of the last token, for the logits window).

    Args:
        model: the loaded shard.
        mode: see above.
        n_ctx: context length (KV cache size).
        n_batch: the largest batch one call may carry.
        n_threads: CPU threads for this context.
        token_input: the batch carries token ids (default: only in ``"embed"`` mode).
        stateless: clear the KV cache before every call (default: only in ``"embed"`` mode); for the
            embedding shard's zero layer, whose cache content never matters.
        n_seq: sequences the KV cache holds at once (llama.cpp sequence ids 0..n_seq-1, each up to ``n_ctx``
            tokens, in one unified cache of ``n_seq * n_ctx`` cells): a batch may mix rows of several
            sequences (:meth:`run_rows`).
        arrays: hidden states come back as numpy arrays [n, n_embd] (the head); False: as flat float32 memoryviews
            of ``n * n_embd`` (a worker, which does not import numpy: 5.5 MiB). Either is a view of the window's
            output buffer, valid until the next call. Both take either as input.

    Raises:
        RuntimeError: llama.cpp could not create the context.
    """

    def __init__(
        self,
        model: Model,
        mode: str,
        n_ctx: int,
        n_batch: int,
        n_threads: int,
        token_input: bool | None = None,
        stateless: bool | None = None,
        n_seq: int = 1,
        arrays: bool = True,
        streamer: LayerStreamer | None = None,
    ) -> None:
        self._rt = _Runtime.get()
        lc = self._lc = self._rt.lc
        self.model, self.mode, self.n_batch = model, mode, n_batch
        self.stateless = mode == "embed" if stateless is None else stateless
        self.n_embd = model.n_embd
        self._stack = ExitStack()
        self.arrays = arrays
        # the output buffer: an anonymous mapping, whose pages (like np.zeros') take memory only once written
        self._out_nbytes = 4 * n_batch * self.n_embd
        self._out_map = mmap.mmap(-1, max(4, self._out_nbytes))
        self._out_ref = ctypes.c_char.from_buffer(self._out_map)  # keeps the mapping's address valid
        self._out_addr = ctypes.addressof(self._out_ref)
        self._out_f = memoryview(self._out_map).cast("f")
        self._out_np: np.ndarray | None = None
        self._rows = 0
        self._captured = False
        self._target = f"l_out-{model.n_layer - 1}".encode()
        self._norm_ops = self._rt.norm_ops
        self._tensor_get = self._rt.ggml.ggml_backend_tensor_get
        self._nbytes = self._rt.ggml.ggml_nbytes
        p = lc.llama_context_default_params()
        if n_seq < 1:
            raise ValueError(f"n_seq must be at least 1, got {n_seq}")
        self.n_seq = 1 if self.stateless else n_seq
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx * self.n_seq, n_batch, n_batch, self.n_seq
        if self.n_seq > 1:
            p.kv_unified = (
                True  # any mix of sequences in one ubatch (one decode = one ubatch: the capture relies on it)
            )
        p.n_threads = p.n_threads_batch = n_threads
        p.no_perf = True
        p.flash_attn_type = FLASH_ATTN_ENABLED if _flash_attn else FLASH_ATTN_DISABLED
        # drop-behind streaming: the streamed layers' outputs end parts of the graph, where it releases them
        self._streamer = streamer
        self._watch: dict[bytes, int] = streamer.watch if streamer is not None else {}
        if mode in ("hidden", "embed") or self._watch:
            cb = (
                self._cb_embed
                if mode == "embed"
                else self._cb_hidden
                if mode == "hidden"
                else self._cb_stream
            )
            self._cb = lc.ggml_backend_sched_eval_callback(cb)
            p.cb_eval = self._cb
        self.ptr = lc.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise RuntimeError(f"llama.cpp could not create a context for {model.path}")
        self._stack.callback(lc.llama_free, self.ptr)
        self.mem = lc.llama_get_memory(self.ptr)
        token_batch = mode == "embed" if token_input is None else token_input
        self.batch = lc.llama_batch_init(n_batch, 0 if token_batch else self.n_embd, 1)
        self._stack.callback(lc.llama_batch_free, self.batch)
        # the batch's input rows as a byte view, made once: a call copies its hidden states in with one slice
        # assignment, without building ctypes pointer objects per call
        self._token_batch = token_batch
        self._embd: memoryview | None = (
            None
            if token_batch
            else memoryview((ctypes.c_float * (n_batch * self.n_embd)).from_address(
                ctypes.cast(self.batch.embd, ctypes.c_void_p).value or 0)).cast("B")
        )  # fmt: skip
        for i in range(n_batch):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
        self.seq_next = [0] * self.n_seq  # the position each sequence's cache continues at

    def close(self) -> None:
        """Free the batch and the context."""
        self._stack.close()
        self.ptr = None

    def __enter__(self) -> Window:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- eval callbacks (called by ggml's scheduler for every graph node) ----------------------------------
    def _cb_hidden(self, t: int, ask: bool, _user: Any) -> bool:
        name = ctypes.string_at(t + _NAME_OFFSET)
        if ask:
            return name == self._target or name in self._watch
        if name in self._watch:
            self._streamer.layer_done(self._watch[name])  # type: ignore[union-attr]
        if name != self._target:
            return True
        self._copy_out(t)
        return False  # stop this split: the output norm and head are not needed

    def _cb_stream(self, t: int, ask: bool, _user: Any) -> bool:
        """A logits window that streams layers: ask for their outputs, release each, compute on."""
        name = ctypes.string_at(t + _NAME_OFFSET)
        if ask:
            return name in self._watch
        self._streamer.layer_done(self._watch[name])  # type: ignore[union-attr]
        return True

    def _cb_embed(self, t: int, ask: bool, _user: Any) -> bool:
        if ask:
            if not self._captured and ctypes.c_int.from_address(t + _OP_OFFSET).value in self._norm_ops:
                self._copy_out(ctypes.c_void_p.from_address(t + _SRC0_OFFSET).value or 0)
                self._captured = True
            return True  # a 0-layer graph has a handful of nodes: compute them one by one
        return not self._captured

    def _copy_out(self, t: int) -> None:
        nbytes = self._nbytes(t)
        self._rows = nbytes // (4 * self.n_embd)
        self._tensor_get(t, self._out_addr, 0, min(nbytes, self._out_nbytes))
        self._captured = True

    def _result(self, n: int) -> Any:
        """The first ``n`` rows of the output buffer: a numpy view [n, n_embd], or a flat memoryview (``arrays``)."""
        if not self.arrays:
            return self._out_f[: n * self.n_embd]
        if self._out_np is None:
            import numpy as np

            self._out_np = np.frombuffer(
                self._out_map, dtype=np.float32, count=self._out_nbytes // 4
            ).reshape(-1, self.n_embd)
        return self._out_np[:n]

    def _n_rows(self, hidden: Any) -> int:
        """Rows of ``hidden``: [n, n_embd] (an array) or a flat buffer of ``n * n_embd`` floats."""
        return int(hidden.shape[0]) if hidden.ndim > 1 else len(hidden) // self.n_embd

    # --- running -------------------------------------------------------------------------------------------
    def _prepare(self, pos0: int, n: int) -> None:
        if n > self.n_batch or n <= 0:
            raise ValueError(f"batch of {n} tokens; this window takes 1..{self.n_batch}")
        if self.stateless:
            self._lc.llama_memory_clear(self.mem, True)
            pos0 = 0
        elif pos0 != self.seq_next[0]:  # a new prompt or a rewind: drop what the cache holds from pos0 on
            self._lc.llama_memory_seq_rm(self.mem, 0, pos0, -1)
        b = self.batch
        b.n_tokens = n
        # the logits window needs the last token's logits; the embedding captures every row at the first norm,
        # before llama.cpp drops the rows not marked as outputs, and marking them all would make llama.cpp size its
        # output buffer (and copy garbage logits) for every row: 8.2 MiB more anonymous memory on the head after a
        # 13-token prompt with a 49k vocabulary (docs/exec.md, "Memory of the executor's processes")
        last_only = self.mode in ("logits", "embed")
        for i in range(n):
            b.pos[i] = pos0 + i
            b.seq_id[i][0] = 0
            b.logits[i] = 0 if (last_only and i < n - 1) else 1
        self._captured = False
        self._rows = 0

    def _decode(self, pos0: int, n: int) -> None:
        rc = self._lc.llama_decode(self.ptr, self.batch)
        if rc != 0:
            raise RuntimeError(
                f"llama_decode failed with status {rc} on {self.model.path.name} at position {pos0}"
            )
        self.seq_next[0] = pos0 + n

    def _prepare_rows(self, positions: Any, seqs: Any, out_rows: set[int]) -> tuple[Any, Any]:
        n = len(positions)
        if n > self.n_batch or n <= 0:
            raise ValueError(f"batch of {n} tokens; this window takes 1..{self.n_batch}")
        first: dict[int, int] = {}
        if self.stateless:  # the zero layer: positions and sequences do not matter
            self._lc.llama_memory_clear(self.mem, True)
            positions, seqs = range(n), [0] * n
        else:
            for i in range(n):
                first.setdefault(int(seqs[i]), int(positions[i]))
        for sq, p0 in first.items():
            if not 0 <= sq < self.n_seq:
                raise ValueError(f"sequence {sq} outside 0..{self.n_seq - 1}")
            if p0 != self.seq_next[sq]:  # a new prompt or a rewind of this sequence
                self._lc.llama_memory_seq_rm(self.mem, sq, p0, -1)
        b = self.batch
        b.n_tokens = n
        logits = self.mode == "logits"
        embed = self.mode == "embed"  # its capture takes every row before the outputs are selected (_prepare)
        for i in range(n):
            b.pos[i] = int(positions[i])
            b.seq_id[i][0] = int(seqs[i])
            b.logits[i] = 1 if (not (logits or embed) or i in out_rows) else 0
        if (logits or embed) and not out_rows:
            b.logits[n - 1] = 1  # llama.cpp computes at least one output
        self._captured = False
        self._rows = 0
        return positions, seqs

    def run_rows(self, hidden: Any, positions: Any, seqs: Any, out_rows: set[int]) -> Any:
        """Run the window on rows of several sequences: row ``i`` is sequence ``seqs[i]`` at ``positions[i]``
        (``hidden`` is [n, n_embd] hidden states, flat or not, or [n] token ids for a token-batch window).

        Each sequence's rows must have consecutive positions; a sequence whose first row does not continue its
        cache has its cache cut at that position first (``llama_memory_seq_rm``), as :meth:`run_hidden` does.
        A ``"logits"`` window computes logits for ``out_rows`` only (read them with :meth:`logits_at`) and
        returns an empty array; other windows return the hidden states of every row (a view).
        """
        n = len(positions)
        positions, seqs = self._prepare_rows(positions, seqs, out_rows)
        if self._token_batch:  # token ids (a token-batch window: the single-process reference)
            for i in range(n):
                self.batch.token[i] = int(hidden[i])
        else:
            self._embed_rows(hidden, n)
        rc = self._lc.llama_decode(self.ptr, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc} on {self.model.path.name}")
        for i in range(n):
            self.seq_next[int(seqs[i])] = int(positions[i]) + 1
        if self.mode == "logits":
            return self._result(0)
        if not self._captured or self._rows != n:
            raise RuntimeError(
                f"hidden-state capture failed on {self.model.path.name} ({self._rows} rows for {n})"
            )
        return self._result(n)

    def logits_at(self, row: int) -> np.ndarray:
        """Logits of batch row ``row`` of the last :meth:`run_rows` (a copy)."""
        import numpy as np

        ptr = self._lc.llama_get_logits_ith(self.ptr, row)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    @property
    def next_pos(self) -> int:
        """The position sequence 0's cache continues at."""
        return self.seq_next[0]

    def _embed_rows(self, hidden: Any, n: int) -> None:
        """Copy ``n`` rows of hidden states (a float32 buffer, e.g. a received frame's memoryview, or an array) into
        the batch: the one copy between the received frame and llama.cpp."""
        if self._embd is None:
            raise ValueError(f"{self.model.path.name}: this window takes token ids, not hidden states")
        if isinstance(hidden, memoryview):
            src = hidden if hidden.format == "B" else hidden.cast("B")
        else:  # an array (the head): float32 and contiguous, converted only if it is not
            import numpy as np

            src = np.ascontiguousarray(hidden, dtype=np.float32).data.cast("B")
        nbytes = 4 * n * self.n_embd
        if src.nbytes != nbytes:
            raise ValueError(f"{n} rows of {self.n_embd} floats are {nbytes} bytes, got {src.nbytes}")
        self._embd[:nbytes] = src

    def run_tokens(self, tokens: list[int] | np.ndarray, pos0: int) -> Any:
        """Embed ``tokens`` (an ``"embed"`` window): returns the layer-0 input, shape [n, n_embd]."""
        n = len(tokens)
        self._prepare(pos0, n)
        for i, tok in enumerate(tokens):
            self.batch.token[i] = int(tok)
        self._decode(pos0, n)
        if not self._captured or self._rows != n:
            raise RuntimeError(
                f"embedding capture failed on {self.model.path.name} ({self._rows} rows for {n} tokens)"
            )
        return self._result(n)

    def run_hidden(self, hidden: Any, pos0: int) -> Any:
        """Run the window on hidden states [n, n_embd] (an array, or a flat float32 buffer of ``n * n_embd``) at
        positions pos0..pos0+n-1.

        Returns:
            The hidden states after the last layer (a ``"hidden"`` window; a view valid until the next call),
            or the logits of the last token (a ``"logits"`` window; a copy).
        """
        n = self._n_rows(hidden)
        self._prepare(pos0, n)
        self._embed_rows(hidden, n)
        self._decode(pos0, n)
        if self.mode == "logits":
            return self.last_logits()
        if not self._captured or self._rows != n:
            raise RuntimeError(
                f"hidden-state capture failed on {self.model.path.name} ({self._rows} rows for {n})"
            )
        return self._result(n)

    def run_tokens_logits(self, tokens: list[int], pos0: int) -> np.ndarray:
        """Run a whole model (a ``"logits"`` window over an unsplit GGUF) on token ids: the reference path."""
        if self.batch.embd:
            raise ValueError("run_tokens_logits needs a token batch (mode 'embed' layout)")
        n = len(tokens)
        self._prepare(pos0, n)
        for i, tok in enumerate(tokens):
            self.batch.token[i] = int(tok)
        self._decode(pos0, n)
        return self.last_logits()

    def last_logits(self) -> np.ndarray:
        """Logits of the last token of the last batch (a copy)."""
        import numpy as np

        ptr = self._lc.llama_get_logits_ith(self.ptr, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()


class Reference:
    """The whole model in one llama.cpp context: the single-process baseline the ring is compared with.

    Args:
        path: the unsplit GGUF.
        n_ctx, n_batch, n_threads, n_seq: as for :class:`Window`.
        repack: as for :class:`Model`.
    """

    def __init__(self, path: str | Path, n_ctx: int, n_batch: int, n_threads: int, n_seq: int = 1,
                 repack: bool = False) -> None:  # fmt: skip
        self.model = Model(path, repack=repack)
        try:
            self.window = Window(
                self.model, "logits", n_ctx, n_batch, n_threads, token_input=True, n_seq=n_seq
            )
        except BaseException:
            self.model.close()
            raise

    def logits(self, tokens: list[int], pos0: int) -> np.ndarray:
        """Decode ``tokens`` at ``pos0`` (in batches of ``n_batch``) and return the logits of the last one."""
        out = None
        for i in range(0, len(tokens), self.window.n_batch):
            out = self.window.run_tokens_logits(tokens[i : i + self.window.n_batch], pos0 + i)
        assert out is not None
        return out

    def close(self) -> None:
        """Free the context and the model."""
        self.window.close()
        self.model.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sampler:
    """llama.cpp's sampler chain: greedy, or top-k -> top-p -> temperature -> seeded draw.

    Args:
        temperature: 0 (or less) for greedy decoding.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0 = all).
        seed: seed of the random draw.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95, seed: int = 0) -> None:
        lc = self._lc = _Runtime.get().lc
        self.ptr = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if temperature <= 0:
            lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_top_k(top_k))
            if top_p < 1.0:
                lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_top_p(top_p, 1))
            lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_temp(temperature))
            lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, window: Window, row: int = -1) -> int:
        """Sample from the logits of ``window``'s output at batch row ``row`` (default: the last output), and
        accept the token."""
        return int(self._lc.llama_sampler_sample(self.ptr, window.ptr, row))

    def close(self) -> None:
        """Free the chain."""
        if self.ptr:
            self._lc.llama_sampler_free(self.ptr)
            self.ptr = None


def default_threads() -> int:
    """Threads when neither a flag nor a device profile says: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
