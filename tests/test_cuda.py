"""attnlab on a CUDA GPU, as a PyTorch user expects it to work there: the building blocks compute on the
GPU what they compute on the CPU (float32, TF32 off), bf16 autocast gives finite values close to float32
and finite gradients, a tiny translation model trains on the GPU with bf16 and its checkpoint loads and
translates on a machine without one, a resumed GPU run ends bit-equal to an uninterrupted one, GPU
decoding picks the CPU's words, and the lean decoding steps equal the modules on the GPU.

Every test here is skipped on a machine without a CUDA GPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import small_config, subprocess_env, tiny_transformer
from test_fast_decode import _model as _language_model
from test_training import assert_same_tensors, last_state

from attnlab import MultiHeadAttention, causal_mask
from attnlab.data.batching import pad_sequences
from attnlab.data.corpus import load_multi30k
from attnlab.decode.generate import generate
from attnlab.decode.nbest import translate_n_best
from attnlab.decode.translate import DecodeConfig, load_translator
from attnlab.errors import ConfigError
from attnlab.nn import fast_decode
from attnlab.train.losses import label_smoothed_loss, linear_cross_entropy
from attnlab.train.trainer import resume, train

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    # With 300 subwords, some validation sentences exceed max_len 64; translate warns that it cuts them.
    pytest.mark.filterwarnings("ignore:.*were cut; their translations cover the start only"),
    # PyTorch's note when autograd's GPU thread makes its first cuBLAS call: harmless.
    pytest.mark.filterwarnings("ignore:Attempting to run cuBLAS, but there was no current CUDA context"),
]

DEVICE = "cuda"
PAD, BOS, EOS = 0, 1, 2
# Token ids of the tiny models' vocabulary of 40, of several lengths (so with padding).
SOURCES = [[5, 6, 7, 8, 9, 10, EOS], [11, 12, EOS], [13, 14, 15, 16, EOS], [3, 4, 5, 6, 7, 8, 9, 10, 11, EOS]]
TARGETS = [[BOS, 20, 21, 22, EOS], [BOS, 23, EOS], [BOS, 24, 25, 26, 27, 28, EOS], [BOS, 29, 30, EOS]]


@pytest.fixture
def exact_float32():
    """Full float32 matrix products on the GPU (no TF32), as on the CPU; the setting is given back."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _on(device: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Leaf copies of ``tensors`` on ``device``, collecting gradients where the original did."""
    return [t.detach().to(device).requires_grad_(t.requires_grad) for t in tensors]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm())


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """src (B, S), target input (B, T) and target output (B, T), padded."""
    tgt = pad_sequences(TARGETS, PAD)
    return pad_sequences(SOURCES, PAD), tgt[:, :-1], tgt[:, 1:]


# -- the building blocks: the GPU computes what the CPU computes ---------------------------------------
@pytest.mark.parametrize("case", ["cross-attention, padding mask", "self-attention, causal and padding mask"])
def test_multi_head_attention_forward_and_backward_on_cuda_equal_the_cpu(exact_float32, case):
    """Output, input gradients and parameter gradients. On the CPU self-attention trains through
    attnlab's short-sequence path, on the GPU through PyTorch's fused kernel: the same maths."""
    torch.manual_seed(0)
    cpu = MultiHeadAttention(32, 4)
    gpu = MultiHeadAttention(32, 4).to(DEVICE)
    gpu.load_state_dict(cpu.state_dict())
    generator = torch.Generator().manual_seed(1)
    B, T, S = 3, 7, 9
    if case.startswith("cross"):  # query (B, T, E), and the memory as key and value
        inputs = [torch.randn(B, T, 32, generator=generator), torch.randn(B, S, 32, generator=generator)]
        keep = torch.tensor([S, 4, 0])  # keys per row; the last row has none (its output must be 0, not NaN)
        mask = (torch.arange(S) < keep[:, None])[:, None, None, :]  # (B, 1, 1, S)
        arguments = [0, 1, 1]  # which input is query, key and value
    else:  # one input, (B, T, E), as query, key and value
        inputs = [torch.randn(B, T, 32, generator=generator)]
        keep = torch.tensor([T, 5, 2])
        mask = causal_mask(T) & (torch.arange(T) < keep[:, None])[:, None, None, :]  # (B, 1, T, T)
        arguments = [0, 0, 0]
    grad = torch.randn(B, T, 32, generator=generator)

    def run(module, device):
        leaves = [t.detach().clone().to(device).requires_grad_() for t in inputs]  # leaves of this run's own
        out = module(*(leaves[i] for i in arguments), mask=mask.to(device)).output
        out.backward(grad.to(device))
        return out, [leaf.grad for leaf in leaves], {n: p.grad for n, p in module.named_parameters()}

    out_cpu, input_grads_cpu, grads_cpu = run(cpu, "cpu")
    out_gpu, input_grads_gpu, grads_gpu = run(gpu, DEVICE)
    assert out_gpu.device.type == DEVICE and out_gpu.dtype == torch.float32
    assert torch.isfinite(out_gpu).all()
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    if case.startswith("cross"):
        assert torch.count_nonzero(out_gpu[2] - gpu.w_o.bias) == 0  # no key: only W_o's bias is left
    for ours, theirs in zip(input_grads_gpu, input_grads_cpu):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-5, atol=1e-5)
    assert grads_gpu.keys() == grads_cpu.keys()
    for name, g in grads_cpu.items():
        assert g.abs().max() > 1e-3, name  # every parameter gets a gradient worth comparing
        torch.testing.assert_close(grads_gpu[name].cpu(), g, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_transformer_logits_and_training_gradients_on_cuda_equal_the_cpu(exact_float32, norm_first):
    """Teacher-forced logits (evaluation mode), and the training loss from the hidden states
    (``linear_cross_entropy``, as the translation task computes it) with every parameter's gradient."""
    src, tgt_in, tgt_out = _batch()
    cpu = tiny_transformer(0, d_model=32, d_ff=64, norm_first=norm_first, share_embeddings=True)
    gpu = tiny_transformer(0, d_model=32, d_ff=64, norm_first=norm_first, share_embeddings=True).to(DEVICE)
    gpu.load_state_dict(cpu.state_dict())
    assert gpu.output.weight is gpu.tgt_embed.embedding.weight  # still tied after the move

    with torch.no_grad():
        logits_cpu, logits_gpu = cpu(src, tgt_in), gpu(src.to(DEVICE), tgt_in.to(DEVICE))
    assert logits_gpu.device.type == DEVICE and logits_gpu.shape == (len(SOURCES), tgt_in.size(1), 40)
    torch.testing.assert_close(logits_gpu.cpu(), logits_cpu, rtol=1e-5, atol=1e-5)

    def loss_and_grads(model, device):
        model.train()  # dropout 0: the same function, through the training paths
        hidden = model(src.to(device), tgt_in.to(device), features_only=True)
        loss, tokens = linear_cross_entropy(hidden, model.output.weight, model.output.bias, tgt_out.to(device), PAD)
        (loss / tokens).backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}

    loss_cpu, grads_cpu = loss_and_grads(cpu, "cpu")
    loss_gpu, grads_gpu = loss_and_grads(gpu, DEVICE)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-5, atol=1e-5)
    assert grads_gpu.keys() == grads_cpu.keys()
    for name, g in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name].cpu(), g, rtol=1e-4, atol=1e-5, msg=name)


def test_transformer_under_bf16_autocast_is_finite_close_to_float32_and_trains(exact_float32):
    src, tgt_in, tgt_out = (t.to(DEVICE) for t in _batch())
    model = tiny_transformer(0, d_model=32, d_ff=64, share_embeddings=True, train=True).to(DEVICE)
    params = dict(model.named_parameters())

    def loss_of(logits):
        loss, tokens = label_smoothed_loss(logits, tgt_out, PAD)
        return loss / tokens

    reference = model(src, tgt_in)
    loss_of(reference).backward()
    reference_grads = torch.cat([p.grad.flatten() for p in params.values()])
    model.zero_grad(set_to_none=True)

    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        hidden = model(src, tgt_in, features_only=True)
        logits = model(src, tgt_in)
        loss = loss_of(logits)
    assert logits.dtype == torch.bfloat16  # the output layer's product, in autocast's dtype
    assert hidden.dtype == torch.float32  # a post-LN decoder ends in a LayerNorm, which autocast keeps in float32
    assert loss.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(hidden).all()
    error = _relative_error(logits, reference)
    assert 0 < error < 5e-2, error  # bf16's rounding, far from float32's, and far below the logits' size

    loss.backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.dtype == torch.float32, name  # float32 weights get float32 gradients
        assert torch.isfinite(p.grad).all(), name
    grads = torch.cat([p.grad.flatten() for p in params.values()])
    assert _relative_error(grads, reference_grads) < 5e-2


def test_linear_cross_entropy_on_cuda_under_bf16_autocast_agrees_with_float32(exact_float32):
    """The training loss on the GPU: in float32 equal to the CPU's, under bf16 autocast within bf16's
    rounding of the float32 loss of the logits, with finite float32 gradients."""
    generator = torch.Generator().manual_seed(0)
    B, T, E, V = 4, 30, 64, 500  # 120 rows, padding among them, in blocks of 32 rows
    hidden = torch.randn(B, T, E, generator=generator, requires_grad=True)
    weight = (torch.randn(V, E, generator=generator) * E**-0.5).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=generator)).requires_grad_()
    lengths = torch.tensor([[30], [12], [25], [1]])  # target tokens per row, then padding
    target = torch.randint(3, V, (B, T), generator=generator).masked_fill(torch.arange(T) >= lengths, PAD)

    def run(loss_fn, device, autocast):
        leaves = _on(device, hidden, weight, bias)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss, tokens = loss_fn(*leaves, target.to(device))
        loss.backward()
        return loss, tokens, [leaf.grad for leaf in leaves]

    def blockwise(h, w, b, y):
        return linear_cross_entropy(h, w, b, y, PAD, 0.1, chunk_rows=32)

    def from_logits(h, w, b, y):
        return label_smoothed_loss(torch.nn.functional.linear(h, w, b), y, PAD, 0.1)

    cpu_loss, cpu_tokens, cpu_grads = run(blockwise, "cpu", False)
    gpu_loss, gpu_tokens, gpu_grads = run(blockwise, DEVICE, False)
    assert int(gpu_tokens) == int(cpu_tokens) == 30 + 12 + 25 + 1
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=0)
    for ours, theirs in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-4, atol=1e-5)

    reference, _, reference_grads = run(from_logits, DEVICE, False)
    loss, _, grads = run(blockwise, DEVICE, True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.device.type == DEVICE
    assert abs(loss.item() - reference.item()) <= 1e-2 * reference.item()
    for name, ours, theirs in zip(("hidden", "weight", "bias"), grads, reference_grads):
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all(), name
        assert theirs.abs().max() > 1e-3, name
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0.03 * float(theirs.abs().max()), msg=name)
    assert torch.count_nonzero(grads[0][(target == PAD).to(DEVICE)]) == 0  # padding rows take no gradient


# -- training end to end on the GPU ------------------------------------------------------------------
STEPS = 144  # eight epochs of the small config's 18 batches: enough for translations of several words


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """A tiny translation model trained on the GPU with bf16 autocast: (config, run folder, summary, log).

    About 7.5 s on an H100 (torch 2.11). It took 13 to 27 s while the trainer let PyTorch's attention
    pick cuDNN's kernel under bf16, which builds a graph for each new batch shape (0.3 to 3 s each);
    the trainer now turns that kernel off (test below)."""
    config = small_config(device=DEVICE, amp=True, max_steps=STEPS, eval_every=STEPS // 4, average_last=0)
    out = tmp_path_factory.mktemp("cuda") / "run"
    messages: list[str] = []
    summary = train(config, out, progress=False, echo=messages.append)
    return config, out, summary, messages


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    """German validation sentences of Multi30k, the small run's own language pair."""
    return [src for src, _ in load_multi30k("val", "de", "en")[:24]]


def test_training_on_cuda_with_bf16_lowers_the_loss_and_writes_a_checkpoint_for_the_cpu(cuda_run, sentences):
    _, out, summary, messages = cuda_run
    assert summary["steps"] == STEPS and summary["stop_reason"] == f"reached max_steps={STEPS}"
    assert any("parameters on cuda" in m for m in messages), messages[:3]  # it trained on the GPU
    evals = [row for row in map(json.loads, (out / "train.jsonl").read_text().splitlines()) if row["event"] == "eval"]
    train_losses, val_losses = [row["train_loss"] for row in evals], [row["val_loss"] for row in evals]
    assert len(evals) == 4 and all(map(math.isfinite, train_losses + val_losses)), evals
    assert train_losses[-1] < train_losses[0] - 0.5, train_losses
    assert val_losses[-1] < val_losses[0], val_losses

    weights, trainer, info = last_state(out)
    assert info["step"] == STEPS
    assert weights and all(t.dtype == torch.float32 for t in weights.values())  # float32 weights, not bf16 copies
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert "rng/cuda" in trainer  # the GPU's random state is kept, for exact resume

    # The run's model translates on the CPU, in this process and in one that sees no GPU at all.
    translator = load_translator(out, device="cpu")
    assert translator.device.type == "cpu"
    expected = translator.translate(sentences[:6], DecodeConfig(beam_size=2))
    assert len(expected) == 6 and any(line.strip() for line in expected)
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "attnlab", "translate", "--checkpoint", str(out), "--device", "cpu",
               "--beam", "2", "--threads", "1", *sentences[:6]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected


def test_a_resumed_run_on_cuda_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    """Stopped at a mid-epoch checkpoint and resumed (in this process), a bf16 GPU run with dropout ends
    bit-equal to one never stopped: weights, Adam's moments and the RNG states, the GPU's included."""
    steps, every = 25, 5
    config = small_config(device=DEVICE, amp=True, max_steps=steps, eval_every=every, average_last=0)
    train(config, tmp_path / "a", progress=False, echo=lambda _: None)
    train(config.override(max_steps=10), tmp_path / "b", progress=False, echo=lambda _: None)
    _, _, stopped = last_state(tmp_path / "b")
    assert (stopped["step"], stopped["epoch"], stopped["batch"]) == (10, 0, 10)  # mid-epoch
    assert resume(tmp_path / "b", max_steps=steps, progress=False, echo=lambda _: None)["steps"] == steps

    weights_a, trainer_a, info_a = last_state(tmp_path / "a")
    weights_b, trainer_b, info_b = last_state(tmp_path / "b")
    assert info_a["step"] == info_b["step"] == steps
    assert_same_tensors(weights_a, weights_b)
    assert_same_tensors(trainer_a, trainer_b)
    assert "rng/cuda" in trainer_a


# -- decoding on the GPU -------------------------------------------------------------------------------
def test_greedy_and_beam_translations_on_cuda_equal_the_cpus(cuda_run, sentences, exact_float32):
    _, out, _, _ = cuda_run
    cpu, gpu = load_translator(out, device="cpu"), load_translator(out, device=DEVICE)
    assert gpu.device.type == DEVICE and cpu.device.type == "cpu"
    for beam in (1, 4):
        config = DecodeConfig(beam_size=beam)
        on_gpu = gpu.translate(sentences, config)
        assert on_gpu == cpu.translate(sentences, config), f"beam {beam}"
        # The lean cached step equals the modules re-reading the prefix, on the GPU as on the CPU.
        assert gpu.translate(sentences, DecodeConfig(beam_size=beam, use_cache=False)) == on_gpu, f"beam {beam}"

    # The barely trained model's best beam may end at once; its four best hypotheses of each sentence
    # come from a longer search: the same tokens on both devices, the same scores to float32's rounding.
    sources = cpu.encode_source(sentences[:8])
    config = DecodeConfig(beam_size=4)
    on_gpu, on_cpu = translate_n_best(gpu, sources, config, 4), translate_n_best(cpu, sources, config, 4)
    assert [[h.tokens for h in best] for best in on_gpu] == [[h.tokens for h in best] for best in on_cpu]
    scores = [h.score for best in on_cpu for h in best]
    assert [h.score for best in on_gpu for h in best] == pytest.approx(scores, rel=1e-5, abs=1e-6)
    assert max(len(h.tokens) for best in on_gpu for h in best) > 3  # multi-token hypotheses were compared
    assert min(map(len, gpu.translate_ids(sources, DecodeConfig(beam_size=1)))) > 3  # so were greedy decodes

    with pytest.raises(ConfigError, match="CPU only"):  # int8 kernels are the CPU's: refused, in one line
        gpu.quantized()


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_the_language_models_lean_step_on_cuda_equals_its_modules(exact_float32, norm_first):
    model = _language_model(norm_first).to(DEVICE)  # vocabulary 30, context 16, non-trivial biases and norms
    packed = fast_decode.pack(model)
    assert packed.embedding.device.type == packed.positions.device.type == DEVICE
    tokens = torch.randint(0, 30, (3, 16), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        full = model(tokens)  # (3, 16, 30)
        state, module_state = model.start(), model.start()
        for a, b in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 12), (12, 13)]:  # a prefix, tokens, a chunk, a token
            logits, state = fast_decode.step(packed, tokens[:, a:b], state)
            assert logits.device.type == DEVICE
            torch.testing.assert_close(logits, full[:, b - 1], atol=1e-5, rtol=0)
            _, module_state = model.step(tokens[:, a:b], module_state)
            for ours, theirs in zip(state.self_kv, module_state.self_kv):
                torch.testing.assert_close(ours.k, theirs.k, atol=1e-5, rtol=0)
                torch.testing.assert_close(ours.v, theirs.v, atol=1e-5, rtol=0)

    prompt = torch.randint(0, 30, (2, 4), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cached = generate(model, prompt, 40, seed=5, keep=8)  # past the context: the window restarts
    assert cached.device.type == DEVICE and cached.shape == (2, 44)
    assert torch.equal(cached, generate(model, prompt, 40, seed=5, keep=8, use_cache=False))


def test_under_torchrun_each_process_trains_on_its_own_gpu(monkeypatch):
    """torchrun's LOCAL_RANK picks the process's GPU (made current, as NCCL wants); one past the
    machine's GPUs is refused in one line that says how many there are."""
    from attnlab.train.trainer import pick_device

    before = torch.cuda.current_device()
    count = torch.cuda.device_count()
    try:
        monkeypatch.setenv("LOCAL_RANK", str(count - 1))
        assert pick_device("cuda") == torch.device("cuda", count - 1) == pick_device("auto")
        assert torch.cuda.current_device() == count - 1
        assert pick_device("cuda:0") == torch.device("cuda", 0)  # a GPU named outright is taken as named
        monkeypatch.setenv("LOCAL_RANK", str(count))
        with pytest.raises(ValueError, match=f"LOCAL_RANK={count} .* of the {count} PyTorch sees"):
            pick_device("cuda")
    finally:
        torch.cuda.set_device(before)


def test_training_with_bf16_turns_cudnn_attention_off(cuda_run):
    """cuDNN's attention builds a graph per new batch shape (seconds each): the trainer leaves it out."""
    assert not torch.backends.cuda.cudnn_sdp_enabled()
