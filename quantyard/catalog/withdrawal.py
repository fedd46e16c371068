"""Withdrawal: a maintainer takes a source or artifact out of use, with a reason, and everything
made from it (any depth down the lineage) is flagged with the same reason and the node that
caused it. Flagged rows stay in the catalog (their lineage, cards and audit trail remain
readable); listings hide them by default and downloads refuse them unless a maintainer asks.

The first withdrawal wins: withdrawing again, or withdrawing a descendant already flagged by an
ancestor, keeps the first reason and root. Artifacts recorded later from a withdrawn parent
inherit its flag (see :func:`inherit_withdrawal`), so "every descendant" stays true.

A withdrawal made in error is undone by :func:`reinstate` on the node that was withdrawn (its
root): the flags it caused are cleared, and a node that still descends from another withdrawn
node takes that one's flag instead, so "every descendant of a withdrawn node is flagged" holds
afterwards too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .audit import RequestInfo, record_audit
from .errors import InvalidArgument, InvalidState, NotFound
from .lineage import Node, descendants, reachable_edges
from .models import Artifact, Source, utcnow

MAX_REASON = 2000


class Withdrawn(InvalidArgument):
    """Raised when something is asked of a withdrawn node (a job on a withdrawn source)."""

    code = "withdrawn"

    def __init__(self, row, what: str):
        withdrawal = withdrawal_of(row)
        assert withdrawal is not None, "Withdrawn is raised for withdrawn rows only"
        self.withdrawal = withdrawal
        root = withdrawal["root"]
        cause = "" if (root["type"], root["id"]) == (_type(row), row.id) else f" (via {root['type']} {root['id']})"
        super().__init__(f"{what}: {_type(row)} {row.id} is withdrawn{cause}: {self.withdrawal['reason']}")


def _type(row) -> str:
    return "source" if isinstance(row, Source) else "artifact"


def _model(node_type: str):
    if node_type not in ("source", "artifact"):
        raise InvalidArgument(f"node type must be source or artifact, not {node_type!r}")
    return Source if node_type == "source" else Artifact


def withdrawal_of(row) -> dict[str, Any] | None:
    """``{"at", "reason", "by", "root": {"type", "id"}}`` of a withdrawn row, else None."""
    return row.withdrawal_dict()["withdrawal"]


def _flag(row, *, at: datetime, reason: str, by: str, root: Node) -> None:
    row.withdrawn_at, row.withdrawn_reason, row.withdrawn_by = at, reason, by
    row.withdrawn_root_type, row.withdrawn_root_id = root


def _entry(row, depth: int) -> dict[str, Any]:
    summary = ({"name": row.name} if isinstance(row, Source)
               else {"format": row.format, "quantization": row.quantization, "filename": row.filename})
    return {"type": _type(row), "id": row.id, "depth": depth, **summary, "withdrawal": withdrawal_of(row)}


def _rows(s: Session, nodes: dict[Node, int]) -> list[tuple[Any, int]]:
    """The rows of ``nodes``, locked for update on Postgres, nearest first then by id."""
    out = []
    for node_type in ("source", "artifact"):
        model = _model(node_type)
        ids = [i for t, i in nodes if t == node_type]
        if ids:
            q = select(model).where(model.id.in_(ids)).with_for_update()
            out += [(row, nodes[(node_type, row.id)]) for row in s.execute(q).scalars()]
    return sorted(out, key=lambda item: (item[1], item[0].id))


def _clear(row) -> None:
    row.withdrawn_at = row.withdrawn_reason = row.withdrawn_by = None
    row.withdrawn_root_type = row.withdrawn_root_id = None


def _check_reason(reason: str | None, what: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise InvalidArgument(f"a {what} needs a reason")
    if len(reason) > MAX_REASON:
        raise InvalidArgument(f"the reason is longer than {MAX_REASON} characters")
    return reason


def _locked_node(s: Session, node_type: str, node_id: str, organization_id: str | None):
    model = _model(node_type)
    row = s.execute(select(model).where(model.id == node_id).with_for_update()).scalars().first()
    if row is None or (organization_id is not None and row.organization_id != organization_id):
        raise NotFound(f"{node_type} {node_id} not found")
    return row


def withdraw(s: Session, *, node_type: str, node_id: str, reason: str, actor: str,
             request: RequestInfo | None = None, organization_id: str | None = None) -> dict[str, Any]:
    """Withdraw a source or artifact and flag every descendant; audited in the caller's
    transaction (one ``<type>.withdraw`` event listing what was flagged, and one
    ``<type>.withdrawn`` event per flagged descendant).

    Returns ``{"node": {...}, "already_withdrawn", "flagged": [...], "already_flagged": [...]}``:
    ``flagged`` are the descendants this call flagged, ``already_flagged`` those an earlier
    withdrawal had (they keep its reason). With ``organization_id`` the node must belong to that
    organisation, and the lists show only its rows; the flags still reach every descendant,
    since a withdrawn base model taints whatever was made from it."""
    reason = _check_reason(reason, "withdrawal")
    root = _locked_node(s, node_type, node_id, organization_id)
    now = utcnow()
    already = root.withdrawn_at is not None
    if not already:
        _flag(root, at=now, reason=reason, by=actor, root=(node_type, node_id))
    # An earlier withdrawal's flag (its reason, its root) is what descendants inherit.
    cause = {"at": now, "reason": root.withdrawn_reason, "by": root.withdrawn_by,
             "root": (root.withdrawn_root_type, root.withdrawn_root_id)}
    flagged, kept = [], []
    for row, depth in _rows(s, descendants(s, node_type=node_type, node_id=node_id)):
        if row.withdrawn_at is None:
            _flag(row, **cause)
            flagged.append((row, depth))
        else:
            kept.append((row, depth))
    s.flush()

    def visible(items):
        return [_entry(r, d) for r, d in items
                if organization_id is None or r.organization_id == organization_id]

    result = {"node": _entry(root, 0), "already_withdrawn": already,
              "flagged": visible(flagged), "already_flagged": visible(kept)}
    record_audit(s, actor=actor, action=f"{node_type}.withdraw", resource_type=node_type, resource_id=node_id,
                 request=request, organization_id=root.organization_id, details={
                     "reason": reason, "already_withdrawn": already, "withdrawal": withdrawal_of(root),
                     "flagged": [{"type": _type(r), "id": r.id, "depth": d} for r, d in flagged],
                     "already_flagged": [{"type": _type(r), "id": r.id} for r, _ in kept]})
    for row, depth in flagged:
        record_audit(s, actor=actor, action=f"{_type(row)}.withdrawn", resource_type=_type(row),
                     resource_id=row.id, request=request, organization_id=row.organization_id,
                     details={"cause": {"type": node_type, "id": node_id}, "depth": depth,
                              "withdrawal": withdrawal_of(row)})
    return result


def _withdrawn_ancestor(s: Session, node: Node):
    """The nearest withdrawn node upstream of ``node`` (any depth), or None."""
    ancestors, _ = reachable_edges(s, start=node, upstream=True)
    for (node_type, node_id), _depth in sorted(ancestors.items(), key=lambda item: (item[1], item[0])):
        row = s.get(_model(node_type), node_id)
        if row is not None and row.withdrawn_at is not None:
            return row
    return None


def reinstate(s: Session, *, node_type: str, node_id: str, reason: str, actor: str,
              request: RequestInfo | None = None, organization_id: str | None = None) -> dict[str, Any]:
    """Undo the withdrawal of a source or artifact (a withdrawal made in error, a licence
    restored). Only the withdrawn node itself can be reinstated: one flagged because an ancestor
    was withdrawn raises InvalidState naming that ancestor. Clears the flag of the node and of
    every descendant it caused; any of them that still descends from another withdrawn node is
    flagged again with that node's reason and root. Audited in the caller's transaction: one
    ``<type>.reinstate`` event (the reason, the withdrawal undone, what was cleared and what stays
    withdrawn) and one ``<type>.reinstated`` or ``<type>.withdrawn`` event per node changed.

    Returns ``{"node", "reinstated": [...], "still_withdrawn": [...]}`` (the node is in one of
    the lists; with ``organization_id`` they show only that organisation's rows)."""
    reason = _check_reason(reason, "reinstatement")
    root = _locked_node(s, node_type, node_id, organization_id)
    if root.withdrawn_at is None:
        raise InvalidState(f"{node_type} {node_id} is not withdrawn")
    cause: Node = (root.withdrawn_root_type, root.withdrawn_root_id)
    if cause != (node_type, node_id):
        raise InvalidState(f"{node_type} {node_id} is withdrawn because {cause[0]} {cause[1]} was withdrawn: "
                           f"reinstate {cause[0]} {cause[1]} instead")
    undone = withdrawal_of(root)
    rows = [(root, 0)] + _rows(s, descendants(s, node_type=node_type, node_id=node_id))
    cleared = [(row, depth) for row, depth in rows if (row.withdrawn_root_type, row.withdrawn_root_id) == cause]
    for row, _ in cleared:
        _clear(row)
    s.flush()
    now, back, still = utcnow(), [], []
    for row, depth in cleared:  # nearest first: a parent flagged again is seen by its children
        other = _withdrawn_ancestor(s, (_type(row), row.id))
        if other is None:
            back.append((row, depth))
            continue
        _flag(row, at=now, reason=other.withdrawn_reason, by=other.withdrawn_by,
              root=(other.withdrawn_root_type, other.withdrawn_root_id))
        still.append((row, depth))
        s.flush()

    def visible(items):
        return [_entry(r, d) for r, d in items
                if organization_id is None or r.organization_id == organization_id]

    record_audit(s, actor=actor, action=f"{node_type}.reinstate", resource_type=node_type, resource_id=node_id,
                 request=request, organization_id=root.organization_id, details={
                     "reason": reason, "undone": undone,
                     "reinstated": [{"type": _type(r), "id": r.id, "depth": d} for r, d in back],
                     "still_withdrawn": [{"type": _type(r), "id": r.id, "depth": d,
                                          "withdrawal": withdrawal_of(r)} for r, d in still]})
    for row, depth in back + still:
        if (row, depth) == (root, 0):
            continue
        action = f"{_type(row)}.reinstated" if row.withdrawn_at is None else f"{_type(row)}.withdrawn"
        record_audit(s, actor=actor, action=action, resource_type=_type(row), resource_id=row.id, request=request,
                     organization_id=row.organization_id,
                     details={"cause": {"type": node_type, "id": node_id, "reinstated": True}, "depth": depth,
                              "withdrawal": withdrawal_of(row)})
    return {"node": _entry(root, 0), "reinstated": visible(back), "still_withdrawn": visible(still)}


def withdraw_source(s: Session, *, source_id: str, reason: str, actor: str,
                    request: RequestInfo | None = None, organization_id: str | None = None) -> dict[str, Any]:
    return withdraw(s, node_type="source", node_id=source_id, reason=reason, actor=actor, request=request,
                    organization_id=organization_id)


def withdraw_artifact(s: Session, *, artifact_id: str, reason: str, actor: str,
                      request: RequestInfo | None = None, organization_id: str | None = None) -> dict[str, Any]:
    return withdraw(s, node_type="artifact", node_id=artifact_id, reason=reason, actor=actor, request=request,
                    organization_id=organization_id)


def inherit_withdrawal(s: Session, *, artifact: Artifact, parents: list[Node], actor: str) -> bool:
    """An artifact recorded from a withdrawn parent (a job that was running when its source was
    withdrawn) is born flagged, with the parent's reason and root; audited. True if flagged."""
    for node_type, node_id in parents:
        parent = s.get(_model(node_type), node_id)
        if parent is not None and parent.withdrawn_at is not None:
            _flag(artifact, at=utcnow(), reason=parent.withdrawn_reason, by=parent.withdrawn_by,
                  root=(parent.withdrawn_root_type, parent.withdrawn_root_id))
            s.flush()
            record_audit(s, actor=actor, action="artifact.withdrawn", resource_type="artifact",
                         resource_id=artifact.id, organization_id=artifact.organization_id,
                         details={"cause": {"type": node_type, "id": node_id},
                                                           "inherited_at_creation": True,
                                                           "withdrawal": withdrawal_of(artifact)})
            return True
    return False


def check_not_withdrawn(s: Session, *, source_id: str) -> None:
    """Refuse new work on a withdrawn source (raises :class:`Withdrawn`)."""
    source = s.get(Source, source_id)
    if source is not None and source.withdrawn_at is not None:
        raise Withdrawn(source, "cannot convert a withdrawn source")
