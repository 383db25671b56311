"""PhysLMForCausalLM for fine-tuning: input embeddings (get/set), resize_token_embeddings,
gradient checkpointing with the same gradients, and PEFT LoRA on the components' linears."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from physlm_graph import PhysLMError, compile_blueprint  # noqa: E402
from physlm_graph._hf import PhysLMForCausalLM  # noqa: E402
from physlm_graph.runtime.checkpoint import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**over) -> PhysLMForCausalLM:
    cm = compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides={
        "params.layers": 2, "params.dim": 32, "params.heads": 2, "params.context": 32, "params.dropout": 0.0,
        "train.seq_len": 32, **over})
    return PhysLMForCausalLM.from_compiled(cm)


def test_input_embeddings_are_the_token_table_and_can_be_replaced():
    model = _model().eval()
    emb = model.get_input_embeddings()
    assert emb is model.model.tok and emb.weight.shape == (65, 32)
    assert model.get_output_embeddings().weight is emb.weight  # baby-gpt ties its head (tie: tok)
    ids = torch.tensor([[1, 2, 3]])
    new = torch.nn.Embedding(65, 32)
    with torch.no_grad():
        new.weight.copy_(emb.weight * 2)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.get_output_embeddings().weight is new.weight
    with torch.no_grad():
        x = model(ids).logits
        model.set_input_embeddings(emb)  # back: the old table, still tied
        assert not torch.allclose(x, model(ids).logits)
    with pytest.raises(PhysLMError, match=r"must hold a weight \(vocab, 32\); got \(65, 8\)"):
        model.set_input_embeddings(torch.nn.Embedding(65, 8))


def test_resize_token_embeddings_changes_the_blueprint_and_keeps_the_old_rows(tmp_path):
    model = _model().eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
    old = model.get_input_embeddings().weight.detach().clone()
    emb = model.resize_token_embeddings(70)
    assert emb.weight.shape == (70, 32) and model.config.vocab_size == 70
    assert "vocab: 70" in model.config.blueprint
    assert torch.equal(emb.weight[:65], old)
    torch.testing.assert_close(emb.weight[65:], old.mean(0, keepdim=True).expand(5, -1))  # mean_resizing
    assert model.get_output_embeddings().weight is emb.weight  # still tied
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :65], before)
    assert model.resize_token_embeddings(None, pad_to_multiple_of=64).weight.shape[0] == 128
    model.save_pretrained(tmp_path / "hf")
    assert load_checkpoint(tmp_path / "hf").model.module.tok.weight.shape == (128, 32)


def test_the_loss_follows_hf_conventions():
    model = _model().eval()
    ids = torch.randint(0, 65, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # not scored
    with torch.no_grad():
        out = model(ids, labels=labels)
        logp = torch.log_softmax(out.logits[:, :-1], -1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # (2, 8)
        scored = labels[:, 1:] != -100
        torch.testing.assert_close(out.loss, nll[scored].mean())
        summed = model(ids, labels=labels, num_items_in_batch=40).loss  # the Trainer's gradient accumulation
        torch.testing.assert_close(summed, nll[scored].sum() / 40)
        loss, logits = model(ids, labels=labels, use_cache=False, return_dict=False)
        assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads(model):
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    model = _model()
    plain = grads(model)
    model.gradient_checkpointing_enable()  # (transformers' deprecated alias)
    assert model.is_gradient_checkpointing
    recomputed = []
    hook = model.model.get_submodule("trunk.0.mlp.fc").register_forward_hook(lambda *a: recomputed.append(1))
    ck = grads(model)
    hook.remove()
    assert len(recomputed) == 2  # the forward ran again in the backward pass
    assert plain.keys() == ck.keys()
    for k in plain:
        torch.testing.assert_close(ck[k], plain[k], rtol=1e-5, atol=1e-6)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    recomputed.clear()
    hook = model.model.get_submodule("trunk.0.mlp.fc").register_forward_hook(lambda *a: recomputed.append(1))
    grads(model)
    hook.remove()
    assert len(recomputed) == 1


def test_peft_lora_trains_on_cpu(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "pretrained" model whose tied head gives logits of some size
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc"], lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("trunk.1.attn.qkv.lora_A" in n for n in trainable) == 1
    text = torch.arange(32).remainder(7)[None].repeat(4, 1)  # a pattern the base model does not know
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=3e-2)
    lora.train()
    losses = []
    for _ in range(20):
        loss = lora(input_ids=text, labels=text).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0], losses
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in lora.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in frozen.items())  # only the adapters moved
    lora.eval()
    with torch.no_grad():  # the adapters are in the graph's modules: generation sees them
        out = lora.generate(input_ids=text[:1, :8], max_new_tokens=7, do_sample=False)
    assert out[0, 8:].tolist() == text[0, 8:15].tolist()
    lora.save_pretrained(tmp_path / "adapter")  # the adapter alone, and back onto a fresh copy of the base
    fresh = _model()
    fresh.load_state_dict(frozen)
    again = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=text).logits, lora(input_ids=text).logits)
