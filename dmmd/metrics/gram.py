"""The Gram matrix of per-example gradients of a causal LM (paper section 5, eq. 13-14).

``K_ij = <grad l_i, grad l_j>`` over every parameter, where ``l_i`` is sequence ``i``'s mean
token negative log-likelihood (over the continuation when a prompt conditions it). One forward
and one backward of the batch's summed loss, with hooks that keep each layer's inputs and
output gradients; the per-example gradients of the whole model are never held at once:

- linear layers (``nn.Linear``, transformers' ``Conv1D``): ``dmmd_ops.grad_gram(a, g)``;
  their biases from the per-example sums of ``g``;
- embeddings: the token-equality trick, ``K_ij = sum_{t,t'} [id_it = id_jt'] <g_it, g_jt'>``;
- LayerNorm weight and bias directly (per-example sums of ``g * x_hat`` and ``g``);
- a parameter used by several modules (GPT-2's tied input embedding and output head) gets
  the Gram of the sum of its per-module gradients: both Grams plus the cross terms.

Examples must be independent in the forward pass (no batch statistics); dropout is turned off.
A module with its own parameters of any other type raises ``ValueError`` naming it, so no
parameter is silently left out.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

import dmmd_ops


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # transformers is optional for models that do not use it
        return ()


@dataclass
class _Use:
    """One module's use of a parameter: per-example gradient ``sum_t g_t (x) a_t`` (``"outer"``,
    ``a`` inputs, ``g`` output gradients), ``sum_t onehot(ids_t) (x) g_t`` (``"rows"``) or
    ``sum_t v_t`` (``"vector"``, ``g`` holding ``v``)."""

    kind: str
    g: torch.Tensor                # [n, T, d_out] (rows: [n, T, d]; vector: [n, T, d])
    a: torch.Tensor | None = None  # outer: [n, T, d_in]
    ids: torch.Tensor | None = None  # rows: [n, T]
    transposed: bool = False       # outer: the weight is stored [d_in, d_out] (Conv1D)


class _Recorder:
    """Forward hooks that keep each supported module's input and output (for its gradient)."""

    def __init__(self, model: nn.Module):
        self.conv1d = _conv1d_type()
        self.records: list[tuple[nn.Module, torch.Tensor, dict]] = []
        self.handles = []
        for name, mod in model.named_modules():
            own = list(mod.parameters(recurse=False))
            if not own:
                continue
            if not isinstance(mod, (nn.Linear, nn.Embedding, nn.LayerNorm)) and not (
                    self.conv1d and isinstance(mod, self.conv1d)):
                raise ValueError(f"per_example_gram does not support module {name!r} "
                                 f"({type(mod).__name__}) with its own parameters")
            self.handles.append(mod.register_forward_hook(self._hook))

    def _hook(self, mod, inputs, output):
        self.records.append((mod, output, {"input": inputs[0].detach()}))

    def remove(self):
        for h in self.handles:
            h.remove()


def _uses(records, weights: dict, n: int) -> dict[int, list[_Use]]:
    """Per parameter (by id), its uses; ``weights`` collects the parameters seen."""
    conv1d = _conv1d_type()
    out: dict[int, list[_Use]] = {}

    def add(p, use):
        if p is not None and p.requires_grad:
            weights[id(p)] = p
            out.setdefault(id(p), []).append(use)

    for mod, _, rec in records:
        g = rec.get("grad")
        if g is None:  # the output did not reach the loss
            continue
        x = rec["input"]
        if g.shape[0] != n:
            raise ValueError(f"{type(mod).__name__}'s output has batch size {g.shape[0]}, not {n}: a "
                             f"broadcast output mixes the examples' gradients")
        if isinstance(mod, nn.Embedding):
            add(mod.weight, _Use("rows", g, ids=x))
        elif isinstance(mod, nn.LayerNorm):
            dims = tuple(range(-len(mod.normalized_shape), 0))
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
            x_hat = (x - mean) / torch.sqrt(var + mod.eps)
            add(mod.weight, _Use("vector", (g * x_hat).flatten(2)))
            add(mod.bias, _Use("vector", g.flatten(2)))
        else:  # nn.Linear or Conv1D
            add(mod.weight, _Use("outer", g, a=x, transposed=bool(conv1d) and isinstance(mod, conv1d)))
            add(mod.bias, _Use("vector", g))
    return out


def _rows_x_rows(u: _Use, v: _Use, chunk: int) -> torch.Tensor:
    """``sum_{t,t'} [ids_u,it = ids_v,jt'] <g_u,it, g_v,jt'>`` for all ``i, j``."""
    n, t = u.ids.shape
    gu, gv = u.g.flatten(0, 1).double(), v.g.flatten(0, 1).double()
    iu, iv = u.ids.flatten(), v.ids.flatten()
    k = torch.zeros(n, n, dtype=torch.float64, device=gu.device)
    for lo in range(0, n, chunk):  # rows of examples i in chunks: memory O(chunk T n T)
        hi = min(n, lo + chunk)
        dots = gu[lo * t:hi * t] @ gv.T
        dots = dots * (iu[lo * t:hi * t, None] == iv[None, :])
        k[lo:hi] = dots.view(hi - lo, t, n, t).sum((1, 3))
    return k


def _outer_x_rows(u: _Use, v: _Use) -> torch.Tensor:
    """``<sum_t g_it (x) a_it, sum_t' onehot(ids_jt') (x) e_jt'>`` for all ``i, j``, with
    ``u`` an output head (``g`` over the vocabulary, ``a`` its inputs) and ``v`` the embedding
    sharing its weight: ``sum_{t,t'} g_it[ids_jt'] <a_it, e_jt'>``."""
    n = u.g.shape[0]
    k = torch.zeros(n, n, dtype=torch.float64, device=u.g.device)
    a = u.a.double()
    for j in range(n):
        gathered = u.g[:, :, v.ids[j]].double()            # [n, T, T']
        dots = torch.einsum("ntd,sd->nts", a, v.g[j].double())
        k[:, j] = (gathered * dots).sum((1, 2))
    return k


def _gram_of(u: _Use, v: _Use, chunk: int) -> torch.Tensor:
    """``<grad_u,i, grad_v,j>`` for two uses of one parameter."""
    kinds = (u.kind, v.kind)
    if kinds == ("vector", "vector"):
        return u.g.double().sum(1) @ v.g.double().sum(1).T
    if kinds == ("outer", "outer") and u is v:
        return dmmd_ops.grad_gram(u.a, u.g).double()
    if kinds == ("rows", "rows"):
        return _rows_x_rows(u, v, chunk)
    if kinds == ("outer", "rows") and not u.transposed:
        return _outer_x_rows(u, v)
    if kinds == ("rows", "outer"):
        return _gram_of(v, u, chunk).T
    raise ValueError(f"per_example_gram: a parameter shared as {u.kind} and {v.kind} is not supported")


def _materialised(uses: list[_Use], shape: torch.Size) -> torch.Tensor:
    """Per-example gradients of one parameter, ``[n, numel]`` (float64), from its uses."""
    n = uses[0].g.shape[0]
    out = torch.zeros(n, *shape, dtype=torch.float64, device=uses[0].g.device)
    for u in uses:
        g = u.g.double()
        if u.kind == "vector":
            out += g.sum(1).view(n, *shape)
        elif u.transposed:  # Conv1D: weight [d_in, d_out]
            out += torch.einsum("nti,nto->nio", u.a.double(), g)
        elif u.kind == "outer":  # Linear: weight [d_out, d_in]
            out += torch.einsum("nto,nti->noi", g, u.a.double())
        else:  # rows: scatter each token's gradient into its row of the [V, d] table
            rows = (torch.arange(n, device=g.device)[:, None] * shape[0] + u.ids).flatten()
            out.view(n * shape[0], -1).index_add_(0, rows, g.flatten(0, 1))
    return out.flatten(1)


# Per-example gradients of one parameter are materialised (instead of the pairwise tricks)
# when they take at most this many float64 numbers: small vocabularies and embeddings.
MATERIALISE_LIMIT = 1 << 25


def _token_losses(logits: torch.Tensor, ids: torch.Tensor, attention_mask, prompt_length: int) -> torch.Tensor:
    """Each sequence's mean next-token NLL over its scored positions: targets at positions
    ``>= max(1, prompt_length)`` that the attention mask keeps. ``[n]``."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    target = ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    scored = torch.ones_like(target, dtype=torch.bool)
    scored[:, :max(0, prompt_length - 1)] = False
    if attention_mask is not None:
        scored &= attention_mask[:, 1:].bool()
    count = scored.sum(1)
    if (count == 0).any():
        raise ValueError("a sequence has no scored token (check prompt_length and attention_mask)")
    return torch.where(scored, nll, 0.0).sum(1) / count


def _model_inputs(model: nn.Module, ids: torch.Tensor, attention_mask) -> dict:
    """The causal LM's inputs. Position ids are passed per example when the model takes them:
    transformers' default ``[1, T]`` positions broadcast over the batch, and the gradient of
    a broadcast embedding output no longer separates the examples."""
    kw = {"input_ids": ids, "attention_mask": attention_mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kw["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
    return kw


def per_example_gram(model: nn.Module, sequences: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                     prompt_length: int = 0, chunk: int = 8, materialise_limit: int = MATERIALISE_LIMIT
                     ) -> torch.Tensor:
    """``K [n, n]`` (float64): inner products of the per-example gradients of each sequence's
    mean token NLL under the causal LM ``model`` (``model(input_ids=..., attention_mask=...)``
    returning ``.logits``, as transformers' causal LMs do), over all its parameters.

    Args:
        sequences: int64 token ids ``[n, T]``.
        attention_mask: optional ``[n, T]`` (1 = real token); padded targets are not scored.
        prompt_length: score only the continuation, tokens at positions ``>= prompt_length``.
        chunk: examples per block in the embedding Gram (memory ``O(chunk * T * n * T)``).
        materialise_limit: embeddings and tied parameters whose per-example gradients fit in
            this many float64 numbers are materialised (cheaper for small vocabularies); larger
            ones use the token-equality and cross-term tricks.
    """
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be token ids [n, T] with T >= 2, got {tuple(sequences.shape)}")
    if not 0 <= prompt_length < sequences.shape[1]:
        raise ValueError(f"prompt_length must be in [0, {sequences.shape[1]}), got {prompt_length}")
    was_training = model.training
    model.eval()  # no dropout: every example's gradient is a function of that example only
    recorder = _Recorder(model)
    try:
        with torch.enable_grad():
            out = model(**_model_inputs(model, sequences, attention_mask))
            logits = out.logits if hasattr(out, "logits") else out
            losses = _token_losses(logits, sequences, attention_mask, prompt_length)
            params = [p for p in model.parameters() if p.requires_grad]
            # Gradients wrt the recorded module outputs only; nothing accumulates in .grad.
            live = [rec for _, o, rec in recorder.records if o.requires_grad]
            outputs = [o for _, o, _ in recorder.records if o.requires_grad]
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
            for rec, g in zip(live, grads, strict=True):
                if g is not None:
                    rec["grad"] = g
    finally:
        recorder.remove()
        model.train(was_training)
    weights: dict[int, torch.Tensor] = {}
    uses = _uses(recorder.records, weights, sequences.shape[0])
    missing = [p for p in params if id(p) not in weights]
    if missing:  # e.g. a weight used by a plain tensor op outside its module's forward
        raise ValueError(f"{len(missing)} trainable parameters got no gradient through the modules that own "
                         f"them; per_example_gram cannot account for them")
    n = sequences.shape[0]
    k = torch.zeros(n, n, dtype=torch.float64, device=sequences.device)
    for pid, plist in uses.items():
        shape = weights[pid].shape
        tricky = len(plist) > 1 or plist[0].kind == "rows"
        if tricky and n * weights[pid].numel() <= materialise_limit:
            flat = _materialised(plist, shape)
            k += flat @ flat.T
            continue
        for a_i, u in enumerate(plist):
            k += _gram_of(u, u, chunk)
            for v in plist[a_i + 1:]:  # cross terms of a shared parameter, both orders
                c = _gram_of(u, v, chunk)
                k += c + c.T
    return k
