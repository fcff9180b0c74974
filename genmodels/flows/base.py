"""Normalizing-flow building blocks shared by RealNVP 2D and the image flow.

Direction convention (as nflows and zuko): a :class:`Transform` maps **data -> noise**.
``forward(x)`` returns ``(z, logabsdet)`` with ``logabsdet = log|det dz/dx|`` of shape ``(B,)``;
``inverse(z)`` returns ``(x, logabsdet)`` with ``logabsdet = log|det dx/dz|``, shape ``(B,)``.
So ``forward`` and ``inverse`` log-dets of matching points are negatives of each other.

Reference: Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class Transform(nn.Module):
    """An invertible map data -> noise with a tractable log-det. Subclasses implement both directions."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """``x`` (B, ...) -> ``(z, log|det dz/dx|)`` with shapes ``(B, ...)`` and ``(B,)``."""
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """``z`` (B, ...) -> ``(x, log|det dx/dz|)`` with shapes ``(B, ...)`` and ``(B,)``."""
        raise NotImplementedError


class Compose(Transform):
    """``T_n o ... o T_1``: forward applies the transforms in order, inverse in reverse order."""

    def __init__(self, transforms: Iterable[Transform]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x)
            total = total + ld
        return x, total

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ld = t.inverse(z)
            total = total + ld
        return z, total


def mlp(
    in_features: int, out_features: int, hidden: int, n_hidden: int, activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """``n_hidden`` hidden layers of width ``hidden``; the output layer starts at zero.

    A zero-initialised output layer makes every coupling start as the identity, the usual
    trick (Glow, nflows) that keeps deep flows stable at the first step.
    """
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    out = nn.Linear(width, out_features)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    layers.append(out)
    return nn.Sequential(*layers)


def relu_linear_1d(x: Tensor, w: Tensor, b: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``relu(x w^T + b) @ weight^T + bias`` for a scalar input, without the ``B x H x H2`` matmul.

    With a one-dimensional input, ``h(x) = relu(w x + b)`` is piecewise linear in ``x`` with
    at most ``H`` kinks at ``t_j = -b_j / w_j``. Between consecutive kinks the set of active
    units is fixed, so the next layer's pre-activation is ``P_k x + Q_k`` on segment ``k``
    with ``P = (M * w) @ weight^T`` and ``Q = (M * b) @ weight^T + bias`` (``M`` (H+1, H) the
    0/1 activity pattern of each segment). Neighbouring segments differ by one unit, so the
    tables are a running sum over the sorted kinks (``O(H H2)``) and each point costs only a
    lookup and an ``O(H2)`` affine map, instead of the ``B H H2`` matmul. The result is the
    same function (equal up to float rounding); gradients reach ``w``, ``b``, ``weight``,
    ``bias`` and ``x`` through autograd, and match ReLU's everywhere except exactly on a kink.
    :class:`ScalarReLUMLP` uses it with three or more hidden layers; with two, the whole net
    is one piece table (:func:`relu_mlp2_1d_pieces`).

    Args:
        x: ``(B, 1)`` inputs.
        w, b: ``(H,)`` first-layer weight column and bias.
        weight, bias: ``(H2, H)`` and ``(H2,)`` of the layer after the ReLU.

    Returns:
        ``(B, H2)`` pre-activations of the second layer.
    """
    with torch.no_grad():
        flat = w == 0
        # Units with w_j = 0 never switch: their kink sits at +inf and their activity is b_j > 0.
        kinks = torch.where(flat, torch.full_like(w, math.inf), -b / torch.where(flat, torch.ones_like(w), w))
        kinks_sorted, order = torch.sort(kinks)
        # Leftmost segment (x -> -inf): units with w_j < 0 are on. Crossing kink j to the right
        # switches unit j on (w_j > 0) or off (w_j < 0).
        active_left = ((w < 0) | (flat & (b > 0))).to(w.dtype)
        toggle = torch.sign(w).index_select(0, order)
        # segment k = number of kinks strictly left of x
        segment = torch.searchsorted(kinks_sorted, x.detach().reshape(-1).contiguous())
    # Per-unit contributions to the next layer, (H, 2 * H2): [w_j * weight[:, j], b_j * weight[:, j]].
    contrib = torch.cat([w.unsqueeze(1) * weight.T, b.unsqueeze(1) * weight.T], dim=1)
    start = active_left @ contrib + torch.cat([torch.zeros_like(bias), bias])
    # Segment tables (H+1, 2 * H2) as a running sum over the sorted kinks: O(H H2), not O(H^2 H2).
    steps = torch.cumsum(toggle.unsqueeze(1) * contrib.index_select(0, order), dim=0)
    table = torch.cat([start.unsqueeze(0), start + steps], dim=0)
    slope, offset = table.index_select(0, segment).chunk(2, dim=1)
    return torch.addcmul(offset, slope, x)


class _SegmentTables(torch.autograd.Function):
    """The dense ``O(L H H2)`` part of :func:`relu_mlp2_1d_pieces`, with a hand-written backward.

    Forward: ``[P, Q]`` (2, L, H2, H+1) (second-layer units by segments) as a running sum over
    the sorted first-layer kinks; from it the fine kinks, the activity pattern, the segment
    starts ``weight_out @ (active [P, Q])`` (2, L, O, H+1) and ``[P, Q]`` at the fine-kink slots
    (2, K). Written out rather than left to autograd because these ``(L, H2, H+1)`` tensors are
    nearly the whole cost of the tables: the backward works in place on one buffer with about
    a third of the ops autograd would record.
    """

    @staticmethod
    def forward(  # noqa: PLR0913 - the weights plus the no-grad first-layer segment data
        ctx: torch.autograd.function.FunctionCtx,
        weight: Tensor,
        wb: Tensor,
        bias: Tensor,
        weight_out: Tensor,
        order: Tensor,
        toggle: Tensor,
        on_left: Tensor,
        left: Tensor,
        right: Tensor,
        compact: bool,
    ) -> tuple[Tensor, ...]:
        n_nets, hidden2, hidden = weight.shape
        n_seg = hidden + 1
        device = weight.device
        coef = wb.gather(2, order.expand(2, -1, -1)) * toggle  # (2, L, H): signed [w_j, b_j] per crossing
        wb_left = on_left * wb  # (2, L, H): units on at x -> -inf
        pq = torch.empty(2, n_nets, hidden2, n_seg, dtype=weight.dtype, device=device)
        pq[..., 0] = torch.bmm(weight, wb_left.permute(1, 2, 0)).permute(2, 0, 1)
        pq[1, :, :, 0] += bias
        weight_sorted = weight.gather(2, order.unsqueeze(1).expand(-1, hidden2, -1))
        torch.mul(coef.unsqueeze(2), weight_sorted, out=pq[..., 1:])
        pq.cumsum_(dim=3)
        p, q = pq[0], pq[1]  # (L, H2, H+1)
        # Pre-activation at the segment's ends (+-finfo.max stand in for +-inf: no inf * 0).
        # Validity and activity both come from these signs, so they cannot disagree.
        sign_left = torch.sign(torch.addcmul(q, p, left))
        valid = (sign_left * torch.sign(torch.addcmul(q, p, right))) < 0
        # on at the left end: pre-activation > 0 there, or == 0 and rising
        active = torch.add(torch.sign(p), sign_left, alpha=2).clamp_(0, 1)
        active_pq = pq * active
        start = weight_out @ active_pq  # (2, L, O, H+1)
        if compact:
            net_e, unit_e, seg_e = valid.nonzero(as_tuple=True)  # only the real kinks
            row_e = net_e * n_seg + seg_e  # segment id over all nets
            slot_e = (net_e * hidden2 + unit_e) * n_seg + seg_e  # into (L, H2, H+1)
            ends = left.view(-1).index_select(0, row_e), right.view(-1).index_select(0, row_e)
            kink_e = torch.div(q.reshape(-1).index_select(0, slot_e), p.reshape(-1).index_select(0, slot_e))
            kink_e = torch.clamp(kink_e.neg_(), *ends)  # rounding must not leave the segment
            kink_e, by_x = torch.sort(kink_e, stable=True)
            row_e, by_row = torch.sort(row_e.index_select(0, by_x), stable=True)  # (segment, x) order
            kink_e = kink_e.index_select(0, by_row)
            by_both = by_x.index_select(0, by_row)
            unit_e, slot_e = unit_e.index_select(0, by_both), slot_e.index_select(0, by_both)
        else:  # every (segment, unit) slot; non-kinks sit at the segment's left end
            kink_e = torch.clamp(torch.div(q, p).neg_(), left, right)
            kink_e, unit_e = torch.sort(torch.where(valid, kink_e, left), dim=1, stable=True)
            kink_e, unit_e = kink_e.transpose(1, 2).reshape(-1), unit_e.transpose(1, 2).reshape(-1)
            row_e = torch.arange(n_nets * n_seg, device=device).repeat_interleave(hidden2)
            net_e, seg_e = torch.div(row_e, n_seg, rounding_mode="floor"), row_e % n_seg
            slot_e = (net_e * hidden2 + unit_e) * n_seg + seg_e
        pq_e = pq.view(2, -1).index_select(1, slot_e)
        sign_e = torch.sign(pq_e[0]) * valid.view(-1).index_select(0, slot_e)  # 0: not a kink
        ctx.save_for_backward(weight, wb_left, on_left, coef, toggle, order, weight_out, active, active_pq, slot_e)
        ctx.mark_non_differentiable(kink_e, row_e, unit_e, sign_e)
        return start, pq_e, kink_e, row_e, unit_e, sign_e

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g_start: Tensor, g_pq_e: Tensor, *_: Tensor) -> tuple:
        weight, wb_left, on_left, coef, toggle, order, weight_out, active, active_pq, slot_e = ctx.saved_tensors
        n_nets, hidden2, hidden = weight.shape
        # Gradient w.r.t. [P, Q]: through the active units into the segment starts, plus the slots.
        g_pq = (weight_out.transpose(1, 2) @ g_start).mul_(active)  # (2, L, H2, H+1)
        g_pq.view(2, -1).index_add_(1, slot_e, g_pq_e)
        g_weight_out = (g_start @ active_pq.transpose(2, 3)).sum(0)
        # Segment k = segment 0 + the first k crossings, so the gradient of segment 0 / crossing r
        # is the sum over segments >= 0 / > r: a cumulative sum from the end, kept reversed.
        g_rev = g_pq.flip(3).cumsum_(dim=3)  # g_rev[..., j] = sum over segments H - j .. H
        g_seg0 = g_rev[..., hidden]  # (2, L, H2)
        g_cross = g_rev[..., :hidden]  # entry j: crossing number H - 1 - j
        order_rev = order.flip(1)
        weight_rev = weight.gather(2, order_rev.unsqueeze(1).expand(-1, hidden2, -1))
        coef_rev = coef.flip(2).unsqueeze(2)
        # crossing r adds coef[:, r] * weight[:, order[r]]: gradients of both factors, un-permuted
        g_coef = (g_cross * weight_rev).sum(2).flip(2)  # (2, L, H), sorted order
        g_weight = torch.addcmul(g_cross[0] * coef_rev[0], g_cross[1], coef_rev[1])
        g_weight = g_weight.gather(2, torch.argsort(order_rev, dim=1).unsqueeze(1).expand(-1, hidden2, -1))
        g_weight.baddbmm_(g_seg0.permute(1, 2, 0), wb_left.transpose(0, 1))  # segment 0's units
        g_wb = (g_coef * toggle).gather(2, torch.argsort(order, dim=1).expand(2, -1, -1))
        g_wb.addcmul_(on_left, torch.bmm(g_seg0.transpose(0, 1), weight).transpose(0, 1))
        return g_weight, g_wb, g_seg0[1], g_weight_out, None, None, None, None, None, None


def relu_mlp2_1d_pieces(
    w: Tensor,
    b: Tensor,
    weight: Tensor,
    bias: Tensor,
    weight_out: Tensor,
    bias_out: Tensor,
    *,
    compact: bool | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Whole two-hidden-layer ReLU MLPs of a scalar input as tables of linear pieces.

    For each of ``L`` nets (parameters stacked along a leading dim),
    ``f(x) = relu(relu(x w^T + b) @ weight^T + bias) @ weight_out^T + bias_out`` is continuous
    and piecewise linear in the scalar ``x``. Net ``l`` gets its breakpoints ``kinks[l]``
    (E_l - 1,), sorted ascending, and ``table[l]`` (E_l, 2 O) = ``[slope, offset]`` per piece, so
    ``f(x) = offset[s] + slope[s] * x`` with ``s = searchsorted(kinks[l], x)`` (the number of
    breakpoints strictly left of ``x``); see :func:`relu_mlp2_1d`. Building the tables costs
    ``O(H H2)`` per net, independent of the batch of points.

    Construction, per net (``H`` first-layer units, ``H2`` second-layer units, ``O`` outputs;
    all nets are processed together, so the op count does not grow with ``L``):

    * coarse kinks: the first-layer kinks ``t_j = -b_j / w_j`` sorted (``+inf`` for ``w_j = 0``:
      such a unit never switches). Coarse segment ``k`` (``0..H``) is ``(t_{k-1}, t_k)`` with
      ``t_{-1} = -inf``, ``t_H = +inf``; segments starting at ``+inf`` are never reached;
    * ``P``, ``Q`` (H2, H+1): the second layer's pre-activation ``P_k x + Q_k`` on segment ``k``,
      a running sum over the sorted coarse kinks of the switching unit's ``w_j weight[:, j]``
      and ``b_j weight[:, j]`` (crossing kink ``j`` rightwards switches unit ``j`` on if
      ``w_j > 0``, off if ``w_j < 0``; at ``-inf`` exactly the units with ``w_j < 0`` are on);
    * second-layer unit ``i`` on segment ``k``: with its pre-activation at the segment's ends,
      ``u = P t_{k-1} + Q`` and ``v = P t_k + Q`` (``+-finfo.max`` stand in for ``+-inf``, so
      ``P = 0`` gives ``u = v = Q``, never ``0 * inf``), it switches inside the segment iff
      ``sign(u) sign(v) < 0`` (a *fine kink*, at ``-Q / P`` clamped into the segment) and is on
      at the segment's left end iff ``u > 0``, or ``u = 0`` and ``P > 0``. Switching, state and
      position all follow from the same ``u``, so rounding can never make them disagree (a
      kink within rounding of a segment end is at worst placed on that end);
    * the segment's first piece ``start[k] = sum_i active [P, Q][i, k] weight_out[:, i]`` (+ ``[0,
      bias_out]``), (H+1, 2 O); each fine kink crossed rightwards adds its unit's
      ``sign(P) [P, Q][i, k] weight_out[:, i]`` (the event's delta, 2 O).

    Events are the segment starts (value ``start``) and the fine kinks (value ``start + running
    sum of deltas within the segment``), in increasing ``x``: segment ``k``'s start, then its
    fine kinks sorted (they lie inside the segment, so segment order is global order). The
    running sum is one cumulative sum over all events of all nets minus its value at the
    segment's start, in float64 so the subtraction cannot cancel digits; the table is cast back.

    Layouts: with ``compact`` (the default on CPU) only the fine kinks become events (a few
    hundred for H = H2 = 128, not ``(H+1) H2``), which needs their count on the host; the fixed
    layout (default elsewhere: no host sync) keeps all ``(H+1) H2`` (segment, unit) slots, one
    without a kink sitting at its segment's left end with a zero delta (it repeats the previous
    piece). Both give the same function.

    Kinks, activity and orderings are computed without gradient; the tables are differentiable
    in all weights (the dense part by :class:`_SegmentTables`' explicit backward), so autograd
    gives the exact gradients of the plain MLP for every ``x`` off the kinks.

    Args:
        w, b: ``(L, H)`` first-layer weight column and bias.
        weight, bias: ``(L, H2, H)`` and ``(L, H2)`` of the second layer.
        weight_out, bias_out: ``(L, O, H2)`` and ``(L, O)`` of the output layer.
        compact: layout as above; ``None`` = compact on CPU only.

    Returns:
        ``kinks`` and ``table``: lists of ``L`` tensors ``(E_l - 1,)`` and ``(E_l, 2 O)``.
    """
    n_nets, hidden = w.shape
    hidden2, n_out = weight.shape[1], weight_out.shape[1]
    n_seg = hidden + 1
    n_rows = n_nets * n_seg  # segments of all nets, each net's in increasing x
    device = w.device
    if compact is None:
        compact = device.type == "cpu"
    with torch.no_grad():
        # +-finfo.max stand in for +-inf (segment ends), so that 0 * end stays 0.
        big = torch.finfo(w.dtype).max
        flat = w == 0  # such a unit never switches: kink at +"inf", on iff b > 0
        t = torch.where(flat, big, -b / torch.where(flat, torch.ones_like(w), w)).clamp_(-big, big)
        # Stable, so that tied kinks are crossed in the same order on every run.
        t, order = torch.sort(t, dim=1, stable=True)  # (L, H)
        on_left = ((w < 0) | (flat & (b > 0))).to(w.dtype)  # activity at x -> -inf
        toggle = torch.sign(w).gather(1, order)  # +1: switches on, -1: off, 0: never switches
        ends = torch.full_like(t[:, :1], big)
        left = torch.cat([-ends, t], dim=1).unsqueeze(1)  # (L, 1, H+1) segment ends
        right = torch.cat([t, ends], dim=1).unsqueeze(1)
    start, pq_e, kink_e, row_e, unit_e, sign_e = _SegmentTables.apply(
        weight, torch.stack([w, b]), bias, weight_out, order, toggle, on_left, left, right, compact
    )
    with torch.no_grad():
        rows = torch.arange(n_rows, device=device)
        before = torch.searchsorted(row_e, rows)  # fine events before each segment start
        pos_row = rows + before  # where each segment start / fine kink goes in the event list
        pos_fine = torch.arange(row_e.numel(), device=device) + row_e + 1
        kinks = w.new_empty(n_rows + row_e.numel())
        kinks.index_copy_(0, pos_row, left.reshape(-1)).index_copy_(0, pos_fine, kink_e)
        net_e = torch.div(row_e, n_seg, rounding_mode="floor")
        if compact:
            sizes = (n_seg + torch.bincount(net_e, minlength=n_nets)).tolist()
        else:
            sizes = [n_seg * (hidden2 + 1)] * n_nets
    # Segment starts as rows (L (H+1), 2 O) = [slope per output, offset per output].
    start = start + torch.stack([torch.zeros_like(bias_out), bias_out]).unsqueeze(3)
    start = start.permute(1, 3, 0, 2).reshape(n_rows, 2 * n_out)
    # Fine-kink deltas (K, 2 O): sign(P) [P, Q] of the switching unit times its output weights.
    w_out_e = weight_out.transpose(1, 2).reshape(-1, n_out).index_select(0, net_e * hidden2 + unit_e)
    delta_e = ((pq_e * sign_e).T.unsqueeze(2) * w_out_e.unsqueeze(1)).reshape(-1, 2 * n_out)
    # Running sum within each segment = global running sum minus its value at the segment start.
    # One 1-D scan per column: CUDA runs a 1-D cumsum as a parallel (CUB) scan, but a scan over
    # dim 0 of the (K, 2 O) matrix as one thread per column stepping through all K rows
    # (K = 231,168 events in the fixed layout, and again in the backward): the likely cause of
    # RealNVP training running 3.4x slower on an H200 than on 2 CPU cores (README, GPU). The CPU
    # adds in the same order either way, so its results are bitwise unchanged.
    cum = torch.stack([col.cumsum(0) for col in delta_e.double().T.contiguous().unbind(0)], dim=1)
    at_start = torch.cat([cum.new_zeros(1, 2 * n_out), cum]).index_select(0, before)
    fine_vals = ((start.double() - at_start).index_select(0, row_e) + cum).to(start.dtype)
    table = start.new_zeros(kinks.numel(), 2 * n_out).index_copy(0, pos_row, start).index_copy(0, pos_fine, fine_vals)
    # Each net's list starts with its segment 0 at -inf: drop that breakpoint, keep the piece.
    return [k[1:] for k in kinks.split(sizes)], list(table.split(sizes))


class _PieceLookup(torch.autograd.Function):
    """``offset[piece] + slope[piece] * x`` with a direct backward (the autograd graph of the
    gather, split and broadcast multiply costs several times the arithmetic at these sizes)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, table: Tensor, piece: Tensor) -> Tensor:
        rows = table.index_select(0, piece)  # (B, 2 O)
        n_out = table.shape[1] // 2
        ctx.save_for_backward(x, rows, piece)
        ctx.table_rows = table.shape[0]
        return torch.addcmul(rows[:, n_out:], rows[:, :n_out], x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, rows, piece = ctx.saved_tensors
        n_out = grad.shape[1]
        g_x = g_table = None
        if ctx.needs_input_grad[0]:
            g_x = (grad * rows[:, :n_out]).sum(dim=1, keepdim=True)
        if ctx.needs_input_grad[1]:
            g_rows = torch.cat([grad * x, grad], dim=1)
            g_table = grad.new_zeros(ctx.table_rows, 2 * n_out).index_add_(0, piece, g_rows)
        return g_x, g_table, None


def relu_mlp2_1d(x: Tensor, kinks: Tensor, table: Tensor) -> Tensor:
    """Evaluate a piece table of :func:`relu_mlp2_1d_pieces` at scalar inputs ``x`` (B, 1) -> (B, O).

    One binary search over the breakpoints, a gather of ``2 O`` numbers and an affine map per
    point, instead of the ``O(H H2)`` of the layer-by-layer evaluation. The gradient w.r.t. ``x``
    is the piece's slope; w.r.t. the table it flows back to the net's weights.
    """
    with torch.no_grad():
        piece = torch.searchsorted(kinks, x.detach().reshape(-1).to(kinks.dtype).contiguous())
    return _PieceLookup.apply(x, table, piece)


class ScalarReLUMLP(nn.Sequential):
    """:func:`mlp` with one input and ReLU (same layers, same state-dict keys), evaluated through
    its exact piecewise-linear form.

    ``(B, 1) -> (B, out_features)``. With ``n_hidden = 2`` the whole net is one table lookup per
    point (:func:`relu_mlp2_1d_pieces`, :func:`relu_mlp2_1d`); the table is built on each call,
    or once for many nets inside :meth:`shared_pieces`. With more hidden layers the first
    hidden-to-hidden layer uses :func:`relu_linear_1d`; with one it is exactly the plain MLP.
    """

    def __init__(self, out_features: int, hidden: int, n_hidden: int) -> None:
        super().__init__(*mlp(1, out_features, hidden, n_hidden, nn.ReLU))
        # (kinks, table) built by shared_pieces for the duration of one call; None otherwise.
        self._pieces: tuple[Tensor, Tensor] | None = None

    def _stacked_params(self) -> tuple[Tensor, ...]:
        first, second, out = self[0], self[2], self[4]
        return first.weight[:, 0], first.bias, second.weight, second.bias, out.weight, out.bias

    def pieces(self) -> tuple[Tensor, Tensor]:
        """This net's ``(kinks, table)`` (``n_hidden = 2`` only), see :func:`relu_mlp2_1d_pieces`."""
        if len(self) != 5:
            raise ValueError(f"a piece table needs n_hidden = 2, this net has {(len(self) - 1) // 2}")
        (kinks,), (table,) = relu_mlp2_1d_pieces(*(p.unsqueeze(0) for p in self._stacked_params()))
        return kinks, table

    @staticmethod
    @contextmanager
    def shared_pieces(nets: Iterable[nn.Module]) -> Iterator[None]:
        """Within the block, the two-hidden-layer :class:`ScalarReLUMLP` among ``nets`` use tables
        built together (one batched :func:`relu_mlp2_1d_pieces` per shape, dtype and device) from
        the parameters as they are on entry: a stack of couplings then builds its tables with
        the op count of one, the main cost of a small-batch step on CPU. Use it around a single
        forward or inverse pass, not across a parameter update."""
        groups: dict[tuple, list[ScalarReLUMLP]] = {}
        for net in nets:
            if isinstance(net, ScalarReLUMLP) and len(net) == 5:
                w = net[2].weight
                groups.setdefault((w.shape, net[4].weight.shape, w.dtype, w.device), []).append(net)
        try:
            for group in groups.values():
                params = zip(*(net._stacked_params() for net in group))
                kinks, tables = relu_mlp2_1d_pieces(*(torch.stack(p) for p in params))
                for net, k, tab in zip(group, kinks, tables, strict=True):
                    net._pieces = (k, tab)
            yield
        finally:
            for group in groups.values():
                for net in group:
                    net._pieces = None

    def forward(self, x: Tensor) -> Tensor:
        if len(self) < 5:  # no hidden-to-hidden layer to shortcut
            return super().forward(x)
        if len(self) == 5:  # Linear, ReLU, Linear, ReLU, Linear: the whole net is one table
            kinks, table = self._pieces if self._pieces is not None else self.pieces()
            return relu_mlp2_1d(x, kinks, table)
        first, second = self[0], self[2]
        h = relu_linear_1d(x, first.weight[:, 0], first.bias, second.weight, second.bias)
        for layer in list(self)[3:]:
            h = layer(h)
        return h


class SharedPiecesCompose(Compose):
    """:class:`Compose` whose :class:`ScalarReLUMLP` conditioners build their piece tables together,
    once per :meth:`forward` / :meth:`inverse` call (:meth:`ScalarReLUMLP.shared_pieces`).

    Same modules and state-dict keys as :class:`Compose`, same results (up to float rounding of
    the batched table construction); only faster for a stack of scalar-input couplings.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with ScalarReLUMLP.shared_pieces(self.modules()):
            return super().forward(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        with ScalarReLUMLP.shared_pieces(self.modules()):
            return super().inverse(z)


class Coupling(Transform):
    """Coupling layer on flat inputs ``(B, D)``: the coordinates in ``mask`` condition an
    element-wise invertible map of the others.

    The base class does the split and merge by index; subclasses only say how the
    transformed part changes given the conditioning part (:meth:`_forward_part`,
    :meth:`_inverse_part`).
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        mask = mask.to(torch.bool).flatten()
        if mask.all() or not mask.any():
            raise ValueError("coupling mask must keep some and transform some coordinates")
        self.register_buffer("cond_idx", torch.nonzero(mask).flatten(), persistent=False)
        self.register_buffer("trans_idx", torch.nonzero(~mask).flatten(), persistent=False)
        self.dim = mask.numel()
        # With one block of each kind (e.g. x | y, or the first | second half) split and merge
        # are a view and a cat: same values, a few ops fewer per call than by index.
        changes = int((mask[1:] != mask[:-1]).sum())
        self._cond_first: bool | None = bool(mask[0]) if changes == 1 else None

    @property
    def n_cond(self) -> int:
        return int(self.cond_idx.numel())

    @property
    def n_trans(self) -> int:
        return int(self.trans_idx.numel())

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._cond_first is not None:
            n_cond = self.n_cond
            if self._cond_first:
                return x[:, :n_cond], x[:, n_cond:]
            n_trans = self.dim - n_cond
            return x[:, n_trans:], x[:, :n_trans]
        return x.index_select(1, self.cond_idx), x.index_select(1, self.trans_idx)

    def _merge(self, cond: Tensor, trans: Tensor) -> Tensor:
        if self._cond_first is not None:
            return torch.cat([cond, trans] if self._cond_first else [trans, cond], dim=1)
        out = torch.empty(cond.shape[0], self.dim, dtype=cond.dtype, device=cond.device)
        out[:, self.cond_idx] = cond
        out[:, self.trans_idx] = trans
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cond, trans = self._split(x)
        trans, ld = self._forward_part(trans, cond)
        return self._merge(cond, trans), ld

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        cond, trans = self._split(z)
        trans, ld = self._inverse_part(trans, cond)
        return self._merge(cond, trans), ld

    def _forward_part(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _inverse_part(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError


class AffineCoupling(Coupling):
    """``z_T = x_T * exp(s(x_C)) + t(x_C)``, log-det ``sum(s)``.

    The log-scale is soft-clamped, ``s = b * tanh(raw / b)`` with bound ``b`` (default 3):
    smooth, identity near 0, and no coupling can multiply by more than ``e^b`` -- the
    "numerically safe scale" that keeps early training and long stacks from overflowing.

    Optionally the conditioning input is soft-clamped too: with ``input_bound = c > 0`` the
    net sees ``c * tanh(x_C / c)`` (identity near 0, within ``(-c, c)``), so shift and
    log-scale are bounded and tend to constants far from the data instead of growing
    linearly like a ReLU net's output; ``0`` (the default) feeds ``x_C`` as is. The log-det is
    unchanged (it does not depend on how ``x_C`` enters the net), and the map is still
    exactly invertible because ``x_C`` passes through.

    Args:
        mask: ``(D,)`` booleans, True = conditioning coordinate.
        net: maps ``(B, n_cond)`` to ``(B, 2 * n_trans)`` = ``[shift, raw log-scale]``;
            built by :func:`mlp` when ``None``.
        input_bound: soft clamp ``c`` of the net's input, 0 = off.
    """

    def __init__(
        self,
        mask: Tensor,
        net: nn.Module | None = None,
        *,
        hidden: int = 128,
        n_hidden: int = 2,
        scale_bound: float = 3.0,
        activation: type[nn.Module] = nn.ReLU,
        input_bound: float = 0.0,
    ) -> None:
        super().__init__(mask)
        if input_bound < 0:
            raise ValueError(f"input_bound must be >= 0 (0 = off), got {input_bound}")
        self.net = net if net is not None else mlp(self.n_cond, 2 * self.n_trans, hidden, n_hidden, activation)
        self.scale_bound = float(scale_bound)
        self.input_bound = float(input_bound)

    def shift_and_log_scale(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``cond`` (B, n_cond) -> shift, log-scale, both (B, n_trans)."""
        c = self.input_bound
        if c > 0:
            cond = c * torch.tanh(cond / c)
        shift, raw = self.net(cond).chunk(2, dim=1)
        b = self.scale_bound
        return shift, b * torch.tanh(raw / b)

    def _forward_part(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.shift_and_log_scale(cond)
        return x * torch.exp(log_scale) + shift, log_scale.sum(dim=1)

    def _inverse_part(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.shift_and_log_scale(cond)
        return (z - shift) * torch.exp(-log_scale), -log_scale.sum(dim=1)


def alternating_masks(dim: int, n_layers: int, kind: str = "half") -> list[Tensor]:
    """Masks for ``n_layers`` couplings that alternate which coordinates are transformed.

    ``half``: first ``dim // 2`` coordinates vs the rest (the seeds' 392 + 392 split; for
    ``dim = 2`` this is x vs y). ``checkerboard``: even vs odd flat indices; for
    28 x 28 images use :func:`checkerboard_mask_2d` for a true spatial checkerboard.
    """
    if kind == "half":
        base = torch.arange(dim) < dim // 2
    elif kind == "checkerboard":
        base = torch.arange(dim) % 2 == 0
    else:
        raise ValueError(f"unknown mask kind {kind!r}; expected 'half' or 'checkerboard'")
    return [base if i % 2 == 0 else ~base for i in range(n_layers)]


def checkerboard_mask_2d(height: int, width: int) -> Tensor:
    """``(H * W,)`` spatial checkerboard (True where row + col is even), flattened row-major."""
    r = torch.arange(height).unsqueeze(1)
    c = torch.arange(width).unsqueeze(0)
    return ((r + c) % 2 == 0).flatten()


class Standardize(Transform):
    """Fixed element-wise affine map ``z = (x - mean) / std`` on flat inputs ``(B, D)``.

    Used as the first transform of a flow so the couplings see roughly unit-scale data
    while ``Flow.log_prob`` stays in the data space: the log-det ``-sum(log std)`` is
    exact, so NLLs are comparable with the data's true entropy. ``mean`` and ``std`` are
    persistent buffers (saved in the state dict), not trained parameters.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Set ``mean``/``std`` from data ``x`` (N, D) (population std, floored at 1e-6)."""
        self.mean.copy_(x.mean(dim=0).to(self.mean))
        self.std.copy_(x.std(dim=0, unbiased=False).clamp_min(1e-6).to(self.std))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ld = -torch.log(self.std).sum()
        return (x - self.mean) / self.std, ld.expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        ld = torch.log(self.std).sum()
        return z * self.std + self.mean, ld.expand(z.shape[0])


class StandardNormal(nn.Module):
    """Isotropic standard normal base distribution on ``shape``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self._log_z = 0.5 * math.prod(self.shape) * math.log(2 * math.pi)

    def log_prob(self, z: Tensor) -> Tensor:
        """``z`` (B, *shape) -> (B,)."""
        return -0.5 * z.pow(2).flatten(1).sum(dim=1) - self._log_z

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        temperature: float = 1.0,
    ) -> Tensor:
        """``(n, *shape)`` draws (times ``temperature``)."""
        z = torch.randn((n, *self.shape), generator=generator, device=device, dtype=dtype)
        return z * temperature if temperature != 1.0 else z


class Flow(nn.Module):
    """A density ``log p(x) = log N(f(x); 0, I) + log|det df/dx|`` with ``f`` a :class:`Transform`.

    Args:
        transform: data -> noise map.
        base: base distribution with ``log_prob`` and ``sample``.
    """

    def __init__(self, transform: Transform, base: StandardNormal) -> None:
        super().__init__()
        self.transform = transform
        self.base = base

    def log_prob(self, x: Tensor) -> Tensor:
        """``x`` (B, ...) -> log-density (B,) in nats."""
        z, logabsdet = self.transform(x)
        return self.base.log_prob(z) + logabsdet

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """``n`` samples ``f^{-1}(z)``, ``z ~ N(0, temperature^2 I)``; shape ``(n, ...)``."""
        p = next(self.parameters(), None)
        device = p.device if p is not None else None
        dtype = p.dtype if p is not None else torch.float32
        z = self.base.sample(n, generator=generator, device=device, dtype=dtype, temperature=temperature)
        x, _ = self.transform.inverse(z)
        return x

    def sample_and_log_prob(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Samples (n, ...) and their log-density (n,) from one inverse pass."""
        p = next(self.parameters(), None)
        device = p.device if p is not None else None
        dtype = p.dtype if p is not None else torch.float32
        z = self.base.sample(n, generator=generator, device=device, dtype=dtype)
        x, ld_inv = self.transform.inverse(z)
        return x, self.base.log_prob(z) - ld_inv


LogProbFn = Callable[[Tensor], Tensor]
