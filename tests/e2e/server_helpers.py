"""Helpers for the server tests: a tiny deterministic model, and `heron serve` as a subprocess.

The "cycle" model is a 1-layer Llama whose attention and MLP outputs are zeroed, so the
residual stream is just the current token's embedding and the LM head maps each token of
CYCLE_TEXT's bytes to the next one: greedy decoding from "T" emits CYCLE_TEXT forever, whatever
the batch. Its tokenizer is byte-level (every byte is a token; no merges), so "😀" takes four
tokens and "é" two: multi-byte characters are always split across tokens. Off-cycle logits are
small (about +-1 against 8 for the successor), so sampling at temperature 1 mostly follows the
cycle but not always: seeds matter.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

CYCLE_TEXT = "Th😀e é中!\n"          # every byte distinct, so "next byte" is a function
NUM_SPECIAL = 3                      # <pad>=0, <s>=1, </s>=2; byte b is token 3 + b
VOCAB = NUM_SPECIAL + 256
REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'T' }}{% endif %}")


def byte_token(b: int) -> int:
    return NUM_SPECIAL + b


def cycle_tokens() -> list[int]:
    return [byte_token(b) for b in CYCLE_TEXT.encode()]


def greedy_text(prompt_last_char: str, num_tokens: int) -> bytes:
    """The bytes the cycle model emits greedily after a prompt ending in `prompt_last_char`."""
    cyc = CYCLE_TEXT.encode()
    pos = cyc.index(prompt_last_char.encode()[-1])
    return bytes(cyc[(pos + 1 + i) % len(cyc)] for i in range(num_tokens))


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte -> printable character map, so that token 3 + b is byte b
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = {b: chr(c) for b, c in zip(bs, cs)}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[byte_to_char[b]] = byte_token(b)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_cycle_model(folder: Path, seed: int = 0) -> Path:
    """Write the cycle model + its byte-level tokenizer (no chat template) to `folder`."""
    import transformers as tf
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    model = tf.LlamaForCausalLM(cfg).eval()
    cyc = cycle_tokens()
    hidden = cfg.hidden_size
    with torch.no_grad():
        emb = torch.randn(VOCAB, hidden)
        q, _ = torch.linalg.qr(torch.randn(hidden, len(cyc)))
        emb[cyc] = q.T * hidden ** 0.5            # cycle tokens: orthogonal, rms 1
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.randn(VOCAB, hidden) * 0.02
        for i, t in enumerate(cyc):
            nxt = cyc[(i + 1) % len(cyc)]
            head[nxt] = emb[t] / hidden ** 0.5    # logit(successor) = 8 after the RMS norm
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`heron serve ...` on 127.0.0.1:<free port>; `start()` waits for /health == 200."""

    def __init__(self, args: list[str], api_key: str | None = None, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.args = args
        self.api_key = api_key
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.startup_s: float | None = None
        self._log = None

    def start(self, timeout: float = 120.0) -> ServerProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost")
        cmd = [sys.executable, "-m", "heron.cli", "serve", *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self._log = open(self.log_path, "w+") if self.log_path else subprocess.DEVNULL
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"heron serve exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"heron serve was not healthy within {timeout} s: {self.log()}")

    def log(self) -> str:
        if self.log_path and Path(self.log_path).exists():
            return Path(self.log_path).read_text()[-4000:]
        return "(no log)"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        """The unlabelled-by-value heron:* samples of /metrics, by name (labels dropped)."""
        text = httpx.get(f"{self.base_url}/metrics", headers=self.headers(), timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("heron:") and "_bucket" not in line:
                name = line.split("{", 1)[0].split(" ", 1)[0]
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None


TINY_SERVER_ARGS = ["--num-threads", "1", "--kv-cache-memory", "0.05", "--dtype", "float32"]
