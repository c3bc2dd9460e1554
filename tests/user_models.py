"""Models nobody on the team designed the toolchain for: what a user brings. Each builder takes
``in_channels`` and ``num_classes`` (the data fills them) and returns an nn.Module that none of
compressor's builders made. Recipes name them as ``user_models:<builder>``.

- vit: a vision Transformer from nn.TransformerEncoder (nn.MultiheadAttention, a class token and
  position embeddings as bare nn.Parameters).
- residual_mlp: blocks in an nn.ModuleList, each an nn.Sequential; the residual add is in forward, and
  forward returns a tuple (logits, features).
- dw_cnn: inverted residual blocks with depthwise convolutions and squeeze-excite.
- hf_resnet, hf_mobilenet, hf_vit, hf_bert: tiny-config Hugging Face classifiers at random
  initialisation (they return ModelOutput).
- lstm, bilstm, conv_gru: recurrent classifiers (a 2-layer LSTM, bidirectional or not; a Conv1d front end and
  a GRU, as in keyword spotting).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ViT(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, image_size=16, patch=4, dim=32, depth=3, heads=4, mlp=128):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        n = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


class ResidualMLP(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, image_size=16, dim=96, hidden=192, depth=4):
        super().__init__()
        self.inp = nn.Linear(in_channels * image_size * image_size, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                                  nn.Linear(hidden, dim)) for _ in range(depth))
        self.out = nn.Linear(dim, num_classes)

    def forward(self, x):
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h), h  # logits and features: a tuple, as many user models return


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(1, c // r), 1), nn.Conv2d(max(1, c // r), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    def __init__(self, c, expand=4):
        super().__init__()
        h = c * expand
        self.body = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                  nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                  SqueezeExcite(h), nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class DepthwiseCNN(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, widths=(16, 32), blocks=2):
        super().__init__()
        layers, c = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU6()], widths[0]
        for i, w in enumerate(widths):
            if w != c:  # MobileNet's transition: a 1x1 to the new width, then a stride-2 depthwise convolution
                layers += [nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6(),
                           nn.Conv2d(w, w, 3, 2, 1, groups=w, bias=False), nn.BatchNorm2d(w), nn.ReLU6()]
                c = w
            layers += [InvertedResidual(c) for _ in range(blocks)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def vit(in_channels=1, num_classes=10, **kw):
    return ViT(in_channels, num_classes, **kw)


def residual_mlp(in_channels=1, num_classes=10, **kw):
    return ResidualMLP(in_channels, num_classes, **kw)


def dw_cnn(in_channels=1, num_classes=10, **kw):
    return DepthwiseCNN(in_channels, num_classes, **kw)


def _hf(config_cls: str, model_cls: str, **cfg):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()


class PaddedCNN(nn.Module):
    """TensorFlow-style "same" padding: an nn.ZeroPad2d before each stride-2 convolution, one of them depthwise
    (EfficientNet and other ports from TensorFlow)."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(in_channels, 16, 3, 2), nn.BatchNorm2d(16),
                                  nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.SiLU())
        self.dw = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(32, 32, 3, 2, groups=32), nn.BatchNorm2d(32),
                                nn.SiLU())
        self.project = nn.Sequential(nn.Conv2d(32, 24, 1), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.head(self.project(self.dw(self.expand(self.stem(x)))).mean((2, 3)))


def padded_cnn(in_channels=1, num_classes=10):
    return PaddedCNN(in_channels, num_classes)


class RawMLP(nn.Module):
    """Weights held as bare parameters and applied with F.linear: no nn.Linear for torch-pruning to cut."""

    def __init__(self, in_channels=1, num_classes=10, d=256, hidden=64):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(hidden, d) * d ** -0.5), nn.Parameter(torch.zeros(hidden))
        self.w2, self.b2 = nn.Parameter(torch.randn(num_classes, hidden) * 0.1), nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x.flatten(1), self.w1, self.b1)), self.w2, self.b2)


def raw_mlp(in_channels=1, num_classes=10):
    return RawMLP(in_channels, num_classes)


def hf_resnet(in_channels=1, num_classes=10):
    return _hf("ResNetConfig", "ResNetForImageClassification", num_channels=in_channels, num_labels=num_classes,
               embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", downsample_in_first_stage=False)


def hf_mobilenet(in_channels=1, num_classes=10):
    return _hf("MobileNetV2Config", "MobileNetV2ForImageClassification", num_channels=in_channels,
               num_labels=num_classes, image_size=16, depth_multiplier=0.25, min_depth=4)


def hf_vit(in_channels=1, num_classes=10):
    return _hf("ViTConfig", "ViTForImageClassification", num_channels=in_channels, num_labels=num_classes,
               image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_dinov2(in_channels=1, num_classes=10):
    """Its head reads the CLS token and the patch tokens' mean concatenated: a cut of the stream does not run."""
    return _hf("Dinov2Config", "Dinov2ForImageClassification", num_channels=in_channels, num_labels=num_classes,
               image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               mlp_ratio=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)


def hf_mpnet(num_classes=4, vocab_size=256):
    """Relative-position buckets computed in float (log of the distance, cast to int64) index a bias table."""
    return _hf("MPNetConfig", "MPNetForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=1,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_beit(in_channels=1, num_classes=10):
    """A relative-position bias table per head in every attention."""
    return _hf("BeitConfig", "BeitForImageClassification", num_channels=in_channels, num_labels=num_classes,
               image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               use_mean_pooling=True, use_relative_position_bias=True)


def hf_mobilevit(in_channels=1, num_classes=10):
    """Inverted residuals and small transformers: its heads make the search cut by width."""
    return _hf("MobileViTConfig", "MobileViTForImageClassification", num_channels=in_channels,
               num_labels=num_classes, image_size=16, patch_size=2, hidden_sizes=[32, 48, 64],
               neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96], num_attention_heads=2, mlp_ratio=2.0,
               expand_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               classifier_dropout_prob=0.0)


def hf_bert(num_classes=4, vocab_size=256):
    return _hf("BertConfig", "BertForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def token_data(n: int = 600, length: int = 16, vocab: int = 256, classes: int = 4, seed: int = 0):
    """A sequence classification task a small BERT learns: the class is which quarter of the vocabulary
    most tokens come from. Yields ({input_ids, attention_mask}, label)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    span = vocab // classes
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask_major = torch.rand(n, length, generator=g) < 0.6
    major = labels[:, None] * span + torch.randint(0, span, (n, length), generator=g)
    ids = torch.where(mask_major, major.clamp_min(1), ids)
    att = torch.ones(n, length, dtype=torch.long)
    return [({"input_ids": ids[i], "attention_mask": att[i]}, int(labels[i])) for i in range(n)]


# Architectures met in a sweep of models nobody here wrote (each once broke a stage; tests/test_more_models.py)

def hf_deberta(num_classes=4, vocab_size=256):
    """Relative-position attention: hands its position table (a Parameter) straight to a Linear."""
    return _hf("DebertaV2Config", "DebertaV2ForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
               max_relative_positions=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_albert(num_classes=4, vocab_size=256):
    """One layer group whose weights every depth shares."""
    return _hf("AlbertConfig", "AlbertForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, classifier_dropout_prob=0.0, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)


def hf_gpt2(num_classes=4, vocab_size=256):
    """forward(input_ids, past_key_values, attention_mask, ...): the mask is not the second argument."""
    return _hf("GPT2Config", "GPT2ForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, pad_token_id=0, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0)


def hf_distilbert(num_classes=4, vocab_size=256):
    """Its attention reshapes by its own n_heads and dim, which a channel cut does not update."""
    return _hf("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=vocab_size,
               num_labels=num_classes, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
               dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)


class DictCNN(nn.Module):
    """Returns {"logits", "features"}: adapted by intake."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        f = self.body(self.stem(x)).mean((2, 3))
        return {"logits": self.head(f), "features": f}


class GroupNormCNN(nn.Module):
    """GroupNorm(4, 16): a cut in blocks of 8 channels cannot keep its groups whole."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16),
                                      nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16),
                                      nn.SiLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class MaskFirst(nn.Module):
    """A token model whose forward takes the mask first and returns a dict: exporters pass inputs by position
    in the data's order (input_ids, attention_mask)."""

    def __init__(self, vocab_size=256, num_classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, attention_mask, input_ids, scale: float = 1.0, return_dict=None):
        # defaulted parameters too: TorchScript's exporter pads positional inputs with every default it sees
        m = attention_mask.unsqueeze(-1).float()
        return {"logits": scale * self.head((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1))}


def dict_cnn(in_channels=1, num_classes=10):
    return DictCNN(in_channels, num_classes)


class FusedQKVBlock(nn.Module):
    """One Linear to q, k and v, split by ``chunk``, and F.scaled_dot_product_attention (timm's and nanoGPT's
    layout): torch-pruning traces the split but cannot index the qkv group."""

    def __init__(self, dim=32, heads=4, mlp=64):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.n1(x)).chunk(3, dim=-1))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.n2(x))


class MixerBlock(nn.Module):
    """MLP-Mixer: a token-mixing MLP over the transposed patch axis, then a channel MLP."""

    def __init__(self, tokens, dim=32, tok_hidden=32, ch_hidden=64):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok = nn.Sequential(nn.Linear(tokens, tok_hidden), nn.GELU(), nn.Linear(tok_hidden, tokens))
        self.ch = nn.Sequential(nn.Linear(dim, ch_hidden), nn.GELU(), nn.Linear(ch_hidden, dim))

    def forward(self, x):
        x = x + self.tok(self.n1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.n2(x))


class PatchNet(nn.Module):
    """Patches (plus a learned position table with ``pos``), then ``depth`` blocks of ``block(tokens)``, a
    LayerNorm and a mean-pooled Linear head."""

    def __init__(self, block, in_channels=1, num_classes=10, patch=4, dim=32, depth=3, image_size=16, pos=False):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, dim) * 0.02) if pos else None
        self.blocks = nn.Sequential(*[block((image_size // patch) ** 2) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(h if self.pos is None else h + self.pos)).mean(1))


def fused_qkv_vit(in_channels=1, num_classes=10):
    return PatchNet(lambda tokens: FusedQKVBlock(), in_channels, num_classes, pos=True)


def mixer(in_channels=1, num_classes=10):
    return PatchNet(MixerBlock, in_channels, num_classes)


class WeightNormCNN(nn.Module):
    """Convolutions under torch.nn.utils.parametrizations.weight_norm."""

    def __init__(self, in_channels=1, num_classes=10, c=24):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.stem = weight_norm(nn.Conv2d(in_channels, c, 3, 2, 1))
        self.c1 = weight_norm(nn.Conv2d(c, c, 3, 1, 1))
        self.c2 = weight_norm(nn.Conv2d(c, c, 3, 1, 1))
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.head(F.relu(x + self.c2(F.relu(self.c1(x)))).mean((2, 3)))


def weight_norm_cnn(in_channels=1, num_classes=10):
    return WeightNormCNN(in_channels, num_classes)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: half the channels pass, half go through a branch, then a channel shuffle."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                                    nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y = torch.cat([x1, self.branch(x2)], 1)
        b, c, hh, ww = y.shape
        return y.view(b, 2, c // 2, hh, ww).transpose(1, 2).contiguous().reshape(b, c, hh, ww)


class ShuffleNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, c=32, blocks=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[ShuffleUnit(c) for _ in range(blocks)])
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def shufflenet(in_channels=1, num_classes=10):
    return ShuffleNet(in_channels, num_classes)


class LenFlatten(nn.Module):
    """A forward that flattens by ``len(x)``: a trace bakes the example's batch into the Reshape."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, 2, 1)
        self.head = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).reshape(len(x), -1))


def len_flatten(in_channels=1, num_classes=10):
    return LenFlatten(in_channels, num_classes)


def group_norm_cnn(in_channels=1, num_classes=10):
    return GroupNormCNN(in_channels, num_classes)


# Decoders and newer encoders: attention without prune_heads, gated FFNs (compressor/groups.py)

_LM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
           pad_token_id=0)


def hf_llama(num_classes=4, vocab_size=256, kv_heads=2):
    """Grouped-query attention (2 key/value heads for 4 query heads), RoPE, RMSNorm and a SwiGLU FFN; its
    attention reshapes by -1 and keeps no head count."""
    return _hf("LlamaConfig", "LlamaForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               num_key_value_heads=kv_heads, **_LM)


def hf_convbert(num_classes=4, vocab_size=256):
    """Span-based dynamic convolution: a depthwise Conv1d over the transposed hidden states beside the heads."""
    return _hf("ConvBertConfig", "ConvBertForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               head_ratio=2, conv_kernel_size=3, num_groups=1, max_position_embeddings=64, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)


def hf_t5(num_classes=4, vocab_size=256):
    """An encoder-decoder classifier: T5's attention keeps its head size as key_value_proj_dim, and layer 0's
    relative position bias serves every layer. Its inputs need one <eos> (id 1) each, at the end."""
    return _hf("T5Config", "T5ForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes, d_model=32,
               d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=0,
               eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8)


def hf_gptj(num_classes=4, vocab_size=256):
    """q_proj/k_proj/v_proj and head_dim as Llama's, but it keeps a head count (num_attention_heads) it reshapes by,
    and rotates only part of each head (rotary_dim)."""
    return _hf("GPTJConfig", "GPTJForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes, n_embd=32,
               n_layer=2, n_head=4, n_positions=64, rotary_dim=4, n_inner=64, pad_token_id=0, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0)


def hf_swin(in_channels=1, num_classes=10):
    """Windowed attention (shifted every other block) with a relative-position bias table indexed by head."""
    return _hf("SwinConfig", "SwinForImageClassification", num_channels=in_channels, num_labels=num_classes,
               image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)


def hf_falcon(num_classes=4, vocab_size=256):
    """Multi-query attention: one key/value head for all query heads, in one fused [q | k | v] projection,
    reshaped by its num_heads."""
    return _hf("FalconConfig", "FalconForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
               new_decoder_architecture=False, pad_token_id=0, hidden_dropout=0.0, attention_dropout=0.0)


def hf_gpt_neox(num_classes=4, vocab_size=256):
    """One query_key_value projection whose rows go head after head, [q k v] each."""
    return _hf("GPTNeoXConfig", "GPTNeoXForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               hidden_dropout=0.0, attention_dropout=0.0, **_LM)


def hf_opt(num_classes=4, vocab_size=256):
    """Separate q, k, v projections reshaped by the ``num_heads`` the attention keeps."""
    return _hf("OPTConfig", "OPTForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
               max_position_embeddings=64, pad_token_id=0, dropout=0.0)


def hf_modernbert(num_classes=4, vocab_size=256):
    """A fused [q | k | v] projection, and a GLU FFN whose gate and up projections are one Linear, chunked."""
    return _hf("ModernBertConfig", "ModernBertForSequenceClassification", vocab_size=vocab_size,
               num_labels=num_classes, **_LM)


def hf_bloom(num_classes=4, vocab_size=256):
    """ALiBi: the position bias has one slope per head, built from the config's head count outside the attention."""
    return _hf("BloomConfig", "BloomForSequenceClassification", vocab_size=vocab_size, num_labels=num_classes,
               hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)


# Speech: a waveform in, a Hugging Face feature encoder (strided convs) and a Transformer

def hf_wav2vec2(num_classes=4):
    """Its feature encoder sets requires_grad on its input while training (for gradient checkpointing)."""
    return _hf("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", num_labels=num_classes, hidden_size=32,
               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
               conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
               classifier_proj_size=32, hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0,
               feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
               feat_extract_norm="group", do_stable_layer_norm=False)


def audio_data(n: int = 600, classes: int = 4, seed: int = 0, samples: int = 1600, rate: int = 8000):
    """(waveform of ``samples`` floats at ``rate`` Hz, label): the label is the frequency band of a sine (band k of
    ``classes`` between 200 and 3400 Hz), at a random phase and amplitude, under white noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    width = 3200 / classes
    f = 200 + labels * width + torch.rand(n, generator=g) * width * 0.8
    t = torch.arange(samples) / rate
    amp = 0.5 + torch.rand(n, 1, generator=g)
    phase = torch.rand(n, 1, generator=g) * 2 * torch.pi
    x = amp * torch.sin(2 * torch.pi * f[:, None] * t + phase) + 0.3 * torch.randn(n, samples, generator=g)
    return [(x[i].float(), int(labels[i])) for i in range(n)]


# Recurrent: what keyword spotting, sensor and time-series models on small devices are built of

class RowLSTM(nn.Module):
    """A digit image's rows as a sequence of 16 steps: a 2-layer LSTM (optionally bidirectional), its last step
    to a Linear head."""

    def __init__(self, in_channels=1, num_classes=10, hidden=64, bidirectional=False):
        super().__init__()
        self.rnn = nn.LSTM(16 * in_channels, hidden, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(1, 2).flatten(2))  # (B, C, 16, 16) -> 16 rows of C x 16
        return self.head(out[:, -1])


class ConvGRU(nn.Module):
    """Keyword-spotting style: a Conv1d front end over time, BatchNorm, a GRU, the mean over time."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(16 * in_channels, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU())
        self.gru = nn.GRU(32, 48, batch_first=True)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x):
        h = self.conv(x.flatten(1, 2)).transpose(1, 2)  # 16 columns of C x 16 features
        out, _ = self.gru(h)
        return self.head(out.mean(1))


def lstm(in_channels=1, num_classes=10):
    return RowLSTM(in_channels, num_classes)


def bilstm(in_channels=1, num_classes=10):
    return RowLSTM(in_channels, num_classes, bidirectional=True)


def conv_gru(in_channels=1, num_classes=10):
    return ConvGRU(in_channels, num_classes)


class TextTransformer(nn.Module):
    """Token and position tables, a pre-LN nn.TransformerEncoder (its nn.MultiheadAttention fused), a head on the
    masked mean of the tokens: a text classifier as a user writes it from torch's own modules."""

    def __init__(self, vocab_size=256, num_classes=4, dim=64, depth=2, heads=4, length=16):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids, attention_mask=None):
        h = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        if attention_mask is None:
            return self.head(self.norm(self.encoder(h)).mean(1))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        h = self.norm(self.encoder(h, src_key_padding_mask=attention_mask == 0))
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))


def text_transformer(num_classes=4, vocab_size=256):
    return TextTransformer(vocab_size, num_classes)
