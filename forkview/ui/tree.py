"""The family tree (`t`): a trace's root, its branches, branches of branches and the
rollout continuations made by the MI estimator, each with its fork position, forced
token(s), origin, status, answer and ✓/✗.

Rollouts come hundreds per trace, so they are grouped per fork position under a
collapsed "N rollout continuations" node, filled in only when it is opened. Enter
opens a node in the explorer, `d` deletes a branch and its subtree (after a
confirmation), `c` marks two nodes and compares them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Label, Static, Tree
from textual.widgets.tree import TreeNode

from forkview import forks
from forkview.forks import FamilyNode
from forkview.ui.compare import CompareScreen
from forkview.ui.family_text import FullTokens, forced_label
from forkview.ui.fork_queue import answer_name, mark
from store import Store, StoreError

STATUS_STYLE = {"complete": "green", "stopped": "yellow", "failed": "bold red",
                "running": "bold cyan"}


@dataclass
class RolloutGroup:
    """The rollout continuations of one trace at one fork position (filled lazily)."""

    parent_id: int
    position: int
    nodes: list[FamilyNode] = field(default_factory=list)
    filled: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return self.parent_id, self.position


NodeData = int | RolloutGroup  # a trace id, or a group of rollouts


class ConfirmScreen(ModalScreen[bool]):
    """y / Enter: yes; n / Esc: no."""

    DEFAULT_CSS = """
    ConfirmScreen {
        align: center middle;
    }
    ConfirmScreen > Vertical {
        width: 64;
        max-width: 100%;
        height: auto;
        border: thick $error;
        background: $surface;
        padding: 1 2;
    }
    ConfirmScreen #confirm-keys {
        margin-top: 1;
        color: $text-muted;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y,enter", "dismiss(True)", "yes"),
        Binding("n,escape", "dismiss(False)", "no"),
    ]

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.message, id="confirm-message")
            yield Label("y / Enter: delete     n / Esc: keep", id="confirm-keys")


class TreeScreen(Screen[int | None]):
    """Dismisses with the trace id to open in the explorer, or None (Esc)."""

    DEFAULT_CSS = """
    TreeScreen #tree-title {
        width: 1fr;
        padding: 0 1;
        background: $panel;
        text-style: bold;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    TreeScreen Tree {
        height: 1fr;
    }
    TreeScreen #tree-hint {
        width: 1fr;
        padding: 0 1;
        color: $text-muted;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "back"),
        Binding("enter", "open", "open", show=True),
        Binding("c", "compare", "compare"),
        Binding("d", "delete", "delete"),
        Binding("question_mark,f1", "app.help", "help"),
        Binding("q", "app.quit", "quit"),
    ]

    def __init__(self, store: Store, trace_id: int, *, browse_only: bool = False) -> None:
        super().__init__()
        self.store = store
        self.trace_id = trace_id  # the trace the explorer shows (cursor starts there)
        self.browse_only = browse_only
        self.root_id: int | None = None
        self.marked: int | None = None  # first node chosen for compare
        self.reopen: int | None = None  # the explorer's trace was deleted: show this one
        self.expanded_groups: set[tuple[int, int]] = set()
        self._parent_steps = FullTokens(store)  # full tokens of parents (labels)
        self.trace_nodes: dict[int, TreeNode[NodeData]] = {}

    def compose(self) -> ComposeResult:
        yield Label("family", id="tree-title")
        tree: Tree[NodeData] = Tree("…", id="family")
        tree.auto_expand = False
        tree.guide_depth = 3
        yield tree
        yield Label(id="tree-hint")
        yield Footer()

    @property
    def family(self) -> Tree[NodeData]:
        return self.query_one("#family", Tree)

    def on_mount(self) -> None:
        self.reload(cursor=self.trace_id)
        self.family.focus()

    # ---------------------------------------------------------------- building
    def reload(self, cursor: int | tuple[int, int] | None = None) -> None:
        """Rebuild from the store, keeping open groups, the cursor and the mark."""
        tree = self.family
        if cursor is None:
            cursor = self._cursor_key()
        try:
            family = forks.family_tree(self.store, self.root_id or self.trace_id)
        except StoreError as e:
            self.query_one("#tree-title", Label).update(f"no family: {e}")
            tree.clear()
            return
        self.root_id = family.trace_id
        self._open_group_of(family, cursor)
        self._parent_steps.clear()
        self.trace_nodes.clear()
        tree.clear()
        tree.root.set_label(self._label(family, root=True))
        tree.root.data = family.trace_id
        self.trace_nodes[family.trace_id] = tree.root
        tree.root.expand()
        tree.root.allow_expand = bool(family.children)
        self._add_children(tree.root, family)
        counts = self._counts(family)
        self.query_one("#tree-title", Label).update(
            f"family of #{self.root_id} · {counts['branch']} branch"
            f"{'es' if counts['branch'] != 1 else ''} · {counts['rollout']} rollout "
            f"continuation{'s' if counts['rollout'] != 1 else ''}")
        self._update_hint()
        node = self._node_for(cursor)
        if node is not None:
            self.call_after_refresh(tree.move_cursor, node)

    def _open_group_of(self, family: FamilyNode, key: Any) -> None:
        """A rollout under the cursor (e.g. the trace the explorer shows): open its group."""
        stack = [family]
        while stack and isinstance(key, int):
            node = stack.pop()
            if node.trace_id == key:
                if node.origin == "rollout" and node.parent_trace_id is not None:
                    self.expanded_groups.add((node.parent_trace_id,
                                              node.fork_position or 0))
                return
            stack.extend(node.children)

    def _counts(self, node: FamilyNode) -> dict[str, int]:
        counts = {"branch": 0, "rollout": 0}
        stack = list(node.children)
        while stack:
            n = stack.pop()
            counts["rollout" if n.origin == "rollout" else "branch"] += 1
            stack.extend(n.children)
        return counts

    def _add_children(self, parent: TreeNode[NodeData], node: FamilyNode) -> None:
        groups: dict[int, list[FamilyNode]] = defaultdict(list)
        items: list[tuple[int, int, int, Any]] = []
        for child in node.children:
            if child.origin == "rollout":
                groups[child.fork_position or 0].append(child)
            else:
                items.append((child.fork_position or 0, 0, child.trace_id, child))
        for pos, members in groups.items():
            items.append((pos, 1, 0, RolloutGroup(node.trace_id, pos, members)))
        for _pos, kind, _id, item in sorted(items, key=lambda t: t[:3]):
            if kind == 0:
                self._add_trace(parent, item)
            else:
                group = parent.add(self._group_label(item), data=item, expand=False)
                if item.key in self.expanded_groups:
                    self._fill_group(group)
                    group.expand()

    def _add_trace(self, parent: TreeNode[NodeData], node: FamilyNode) -> None:
        label = self._label(node)
        if node.children:
            child = parent.add(label, data=node.trace_id, expand=True)
            self._add_children(child, node)
        else:
            child = parent.add_leaf(label, data=node.trace_id)
        self.trace_nodes[node.trace_id] = child

    def _fill_group(self, tree_node: TreeNode[NodeData]) -> None:
        group = tree_node.data
        if not isinstance(group, RolloutGroup) or group.filled:
            return
        group.filled = True
        for node in sorted(group.nodes, key=lambda n: n.trace_id):
            self._add_trace(tree_node, node)

    @on(Tree.NodeExpanded)
    def _expanded(self, event: Tree.NodeExpanded[NodeData]) -> None:
        if isinstance(event.node.data, RolloutGroup):
            self._fill_group(event.node)
            self.expanded_groups.add(event.node.data.key)

    @on(Tree.NodeCollapsed)
    def _collapsed(self, event: Tree.NodeCollapsed[NodeData]) -> None:
        if isinstance(event.node.data, RolloutGroup):
            self.expanded_groups.discard(event.node.data.key)

    # ---------------------------------------------------------------- labels
    def forced_text(self, node: FamilyNode) -> str:
        return forced_label(self.store, node.trace_id, node.parent_trace_id,
                            node.fork_position, node.forced_token_ids,
                            self._parent_steps)

    def _label(self, node: FamilyNode, root: bool = False) -> Text:
        tid = node.trace_id
        text = Text(no_wrap=True, overflow="ellipsis")
        if self.marked == tid:
            text.append("◆ ", style="bold magenta")
        text.append(f"#{tid}", style="bold underline" if tid == self.trace_id else "bold")
        if root:
            text.append(" root", style="dim")
        else:
            text.append(f" @{node.fork_position}", style="bold")
            forced = self.forced_text(node)
            if forced:
                text.append(f" {forced}", style="italic" if forced == "resampled" else "")
            text.append(f" {node.origin}", style="dim")
        text.append(" · ")
        text.append(node.status, style=STATUS_STYLE.get(node.status, ""))
        text.append(f" · {node.n_tokens} tok · ")
        answer = node.answer
        text.append(f"answer {answer_name(answer)}" if answer is not None else "no answer",
                    style="" if answer is not None else "dim")
        correct = node.correct
        text.append(mark(correct), style="bold green" if correct else "bold red")
        return text

    @staticmethod
    def _group_label(group: RolloutGroup) -> Text:
        n = len(group.nodes)
        answers: dict[str, int] = defaultdict(int)
        for node in group.nodes:
            answers[answer_name(node.answer)] += 1
        top = sorted(answers.items(), key=lambda kv: -kv[1])[:3]
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"@{group.position} ", style="bold")
        text.append(f"{n} rollout continuation{'s' if n != 1 else ''}", style="italic")
        text.append(" · " + " ".join(f"{a}×{c}" for a, c in top), style="dim")
        return text

    def _update_hint(self) -> None:
        if self.marked is not None:
            hint = f"◆ #{self.marked} marked: c on another node compares them, Esc clears"
        else:
            hint = "Enter open · Space fold · c compare two · d delete a branch · Esc back"
        self.query_one("#tree-hint", Label).update(hint)

    # ---------------------------------------------------------------- cursor
    def _cursor_key(self) -> int | tuple[int, int] | None:
        node = self.family.cursor_node
        if node is None:
            return None
        return node.data.key if isinstance(node.data, RolloutGroup) else node.data

    def _node_for(self, key: int | tuple[int, int] | None) -> TreeNode[NodeData] | None:
        if isinstance(key, int):
            return self.trace_nodes.get(key)
        if isinstance(key, tuple):
            parent = self.trace_nodes.get(key[0])
            for child in parent.children if parent is not None else []:
                if isinstance(child.data, RolloutGroup) and child.data.key == key:
                    return child
        return None

    def selected_trace(self) -> int | None:
        node = self.family.cursor_node
        return node.data if node is not None and isinstance(node.data, int) else None

    # ---------------------------------------------------------------- actions
    @on(Tree.NodeSelected)
    def _selected(self, event: Tree.NodeSelected[NodeData]) -> None:
        event.stop()
        if isinstance(event.node.data, RolloutGroup):
            event.node.toggle()
        elif isinstance(event.node.data, int):
            self.dismiss(event.node.data)

    def action_open(self) -> None:
        self.family.action_select_cursor()

    def action_back(self) -> None:
        if self.marked is not None:
            self.marked = None
            self.reload()
            return
        self.dismiss(self.reopen)

    def action_compare(self) -> None:
        tid = self.selected_trace()
        if tid is None:
            self.notify("Put the cursor on a trace (not a group) to compare it.",
                        severity="warning")
            return
        if self.marked is None:
            self.marked = tid
            self.reload()
            return
        if self.marked == tid:
            self.notify("That node is already marked: choose another one.", severity="warning")
            return
        first, self.marked = self.marked, None
        self.reload()
        self.app.push_screen(CompareScreen(self.store, first, tid))

    def action_delete(self) -> None:
        tid = self.selected_trace()
        if tid is None:
            self.notify("Put the cursor on a branch to delete it.", severity="warning")
            return
        if self.browse_only:
            self.notify("Browse-only mode opens the database read-only: nothing can be "
                        "deleted here.", severity="warning")
            return
        try:
            info = self.store.trace(tid)
            below = self.store.descendant_ids(tid)
        except StoreError as e:
            self.notify(str(e), severity="error")
            return
        if info.is_root and below:
            # Refused by the store before anything is touched; said at once, without
            # asking first.
            self._delete(tid, True)
            return
        what = f"branch #{tid}" if not info.is_root else f"trace #{tid} (a root)"
        sub = (f" and the {len(below)} trace{'s' if len(below) != 1 else ''} below it"
               if below else "")
        self.app.push_screen(
            ConfirmScreen(f"Delete {what}{sub}? Its tokens and MI values go too; "
                          "nothing else is touched."),
            callback=lambda yes: self._delete(tid, bool(yes)))

    def _delete(self, tid: int, confirmed: bool) -> None:
        if not confirmed:
            return
        try:
            deleted = self.store.delete_branch(tid)
        except StoreError as e:
            self.notify(str(e), title="not deleted", severity="error", timeout=8)
            return
        self.notify(f"Deleted {len(deleted)} trace{'s' if len(deleted) != 1 else ''}: "
                    f"#{', #'.join(map(str, deleted))}.", timeout=5)
        if self.marked in deleted:
            self.marked = None
        if tid == self.root_id:
            self.dismiss(None)
            return
        parent = self._surviving_parent(tid)
        if self.trace_id in deleted and parent is not None:
            # the explorer showed a deleted trace: back there, it shows this one
            self.trace_id = self.reopen = parent
        self.reload(cursor=parent)

    def _surviving_parent(self, tid: int) -> int | None:
        node = self.trace_nodes[tid].parent if tid in self.trace_nodes else None
        while node is not None and not isinstance(node.data, int):
            node = node.parent
        return node.data if node is not None else None
