"""ComposerMambaLM: the chunked training loss equals the plain loss on the model's logits, eval
logits cover the real vocabulary only, and flops_per_batch follows the formula, also on the
loader's undecoded batches through its batch_shape."""
import torch
import torch.nn.functional as F

from mamba.data.loader import batch_shape
from mamba.layout import IGNORE_INDEX
from mamba.model.composer_model import ComposerMambaLM
from mamba.model.flops import flops_per_token
from mamba.model.lm import MambaConfig, MambaLMHeadModel


def make(tie=True, ssm_layer="mamba1"):
    torch.manual_seed(0)
    config = MambaConfig(d_model=16, n_layer=2, vocab_size=37, ssm_layer=ssm_layer, headdim=8, d_state=8,
                         chunk_size=4, kernels="torch", tie_embeddings=tie, loss_chunk_size=5)  # head: 40 rows
    model = MambaLMHeadModel(config).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (2, 11), generator=g)
    labels = torch.randint(0, 37, (2, 11), generator=g)
    labels[0, :4] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(6), torch.arange(5)]).expand(2, -1)  # two documents
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids}
    return ComposerMambaLM(model), batch


def test_training_loss_and_gradients_equal_plain_cross_entropy():
    for tie in (True, False):
        for layer in ("mamba1", "mamba2"):
            cm, batch = make(tie, layer)
            loss = cm.loss(cm(batch), batch)
            assert loss.shape == ()  # training forward returns the loss, never the logits
            grads = torch.autograd.grad(loss, list(cm.parameters()))
            # The plain loss: full logits, padded vocab rows sliced off (they are not tokens).
            logits = cm.model(batch["input_ids"], batch["position_ids"])[..., :37]
            want = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
            want_grads = torch.autograd.grad(want, list(cm.parameters()))
            torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)  # float64 model
            for (name, _), g, w in zip(cm.named_parameters(), grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12, msg=f"{tie} {layer} {name}")


def test_eval_logits_cover_the_real_vocab_and_feed_the_metrics():
    cm, batch = make()
    logits = cm.eval_forward(batch)
    assert logits.shape == (2, 11, 37)
    full = cm.model(batch["input_ids"], batch["position_ids"])
    torch.testing.assert_close(logits, full[..., :37], rtol=0, atol=0)
    metric = cm.get_metrics(is_train=False)["LanguageCrossEntropy"]
    cm.update_metric(batch, logits, metric)
    torch.testing.assert_close(metric.compute().double(), cm.loss(cm(batch), batch), rtol=1e-6, atol=0)
    assert cm.get_metrics(is_train=True) == {}


def test_flops_per_batch_uses_the_formula_and_the_sequence_length():
    cm, batch = make(ssm_layer="mamba2")
    assert cm.flops_per_batch(batch) == flops_per_token(cm.model.config, seq_len=11) * 22


def test_flops_per_batch_reads_undecoded_windows_through_the_loaders_batch_shape():
    cm, _ = make(ssm_layer="mamba2")
    cm = ComposerMambaLM(cm.model, batch_shape=batch_shape)
    words = {"words": torch.zeros(2, 12, dtype=torch.int32)}  # windows of L + 1 words: the model sees 11
    assert batch_shape(words) == (2, 11)
    assert cm.flops_per_batch(words) == flops_per_token(cm.model.config, seq_len=11) * 22
    assert cm.flops_per_batch({"input_ids": torch.zeros(3, 7, dtype=torch.long)}) == \
        flops_per_token(cm.model.config, seq_len=7) * 21
