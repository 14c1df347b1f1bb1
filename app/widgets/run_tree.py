"""The optimization tree: one TreeNode per run node, added in batches, relabelled only on change.

Why these rules (measured on Textual 8, see shared/DESIGN.md): every add or expand makes the
Tree rebuild its list of visible lines, relayout the screen and repaint itself, so adding nodes
one per frame costs ~56 ms a frame at 1k nodes. Here all nodes created since the last frame are
added in one go (one rebuild), nodes deeper than `EXPAND_DEPTH` start collapsed, and the
children of a collapsed node are not handed to the Tree at all until it is expanded (they wait
in `_deferred`): at 10k nodes most new nodes land under collapsed branches and then cost no
repaint. A dict maps node IDs to TreeNodes, and `get_label_width` is estimated, not rendered.

Each frame (`draw`) adds the batch's new nodes and relabels its dirty ones; a frame with no
events (a tick of the spinner) relabels the running nodes, whose glyph turns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from looptree.app.labels import label_key, node_label
from looptree.app.messages import RunChanged
from looptree.app.model import RunView
from looptree.app.widgets.base import RunWidget


class RunTree(RunWidget, Tree[str], inherit_bindings=False):  # Tree's `space` toggles nodes; here it pauses the run
    EXPAND_DEPTH: ClassVar[int] = 2  # nodes with fewer dots than this start expanded
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor_up", "Up", show=False),
        Binding("down", "cursor_down", "Down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("left", "collapse_or_parent", "Collapse", show=False),
        Binding("right", "expand_node", "Expand", show=False),
        Binding("enter", "toggle_node", "Expand/collapse", show=False),
        Binding("shift+up", "cursor_previous_sibling", "Previous sibling", show=False),
        Binding("shift+down", "cursor_next_sibling", "Next sibling", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__("run", id=id)
        self.show_root = False
        self.guide_depth = 2
        self.by_id: dict[str, TreeNode[str]] = {}
        self._keys: dict[str, tuple[Any, ...]] = {}
        self._deferred: dict[str, list[str]] = {}  # parent ID → children not yet in the Tree
        self._view: RunView | None = None
        self._frame: int | None = None

    # -- building ------------------------------------------------------------------------
    def draw(self, frame: RunChanged) -> None:
        view, changes = frame.view, frame.changes
        if frame.reset:
            self.rebuild(view, frame.frame)  # a backwards seek: every node of the new fold
        elif changes.new_nodes:
            self.add_nodes(view, changes.new_nodes, frame.frame)
        self.update_labels(view, changes.dirty_nodes, frame.frame)
        if frame.tick and view.running:
            self.update_labels(view, self.spinner_targets(view), frame.frame)

    def add_nodes(self, view: RunView, node_ids: Iterable[str], frame: int | None) -> int:
        """Add freshly created nodes (parents before children); one line rebuild for the batch.

        A node whose parent is collapsed (or itself still deferred) waits in `_deferred` and
        is added when the parent is expanded; the parent just shows its expand arrow.
        """
        self._view, self._frame = view, frame
        added = 0
        nodes = view.state.nodes
        for node_id in node_ids:
            node = nodes.get(node_id)
            if node is None or node_id in self.by_id:
                continue
            if node.parent is not None and node.parent in nodes:
                parent = self.by_id.get(node.parent)
                if parent is None or not parent.is_expanded:
                    self._deferred.setdefault(node.parent, []).append(node_id)
                    if parent is not None and not parent.allow_expand:
                        parent.allow_expand = True
                        self._refresh_node(parent)
                    continue
            added += self._add_one(view, node_id, frame)
        return added

    def _add_one(self, view: RunView, node_id: str, frame: int | None) -> int:
        node = view.state.nodes[node_id]
        parent = self.by_id.get(node.parent or "", self.root)
        if parent is not self.root and not parent.allow_expand:
            parent.allow_expand = True
        expand = node.depth < self.EXPAND_DEPTH
        tree_node = parent.add(node_label(view, node, frame), data=node_id, expand=expand,
                               allow_expand=bool(node.children))
        self.by_id[node_id] = tree_node
        self._keys[node_id] = label_key(view, node, frame)
        if expand and node_id in self._deferred:
            self._materialize(node_id)
        return 1

    def _materialize(self, node_id: str) -> int:
        """Hand a node's waiting children to the Tree (it was just expanded, or born expanded)."""
        waiting = self._deferred.pop(node_id, None)
        view = self._view
        if not waiting or view is None:
            return 0
        return sum(self._add_one(view, child, self._frame) for child in waiting if child not in self.by_id)

    def on_tree_node_expanded(self, event: Tree.NodeExpanded[str]) -> None:
        if event.node.data is not None:
            self._materialize(event.node.data)

    def update_labels(self, view: RunView, node_ids: Iterable[str], frame: int | None) -> int:
        """Relabel the given nodes whose shown content changed; returns how many changed."""
        changed = 0
        nodes = view.state.nodes
        for node_id in node_ids:
            tree_node = self.by_id.get(node_id)
            node = nodes.get(node_id)
            if tree_node is None or node is None:
                continue
            key = label_key(view, node, frame)
            if self._keys.get(node_id) != key:
                self._keys[node_id] = key
                tree_node.set_label(node_label(view, node, frame))
                changed += 1
        return changed

    def rebuild(self, view: RunView, frame: int | None) -> None:
        """Start over (a backwards seek in replay re-folds the run from its first event)."""
        self.clear()
        self.by_id.clear()
        self._keys.clear()
        self._deferred.clear()
        self.add_nodes(view, view.state.order, frame)

    # -- navigation ----------------------------------------------------------------------
    @property
    def selected_id(self) -> str | None:
        node = self.cursor_node
        return node.data if node is not None else None

    def select_id(self, node_id: str) -> bool:
        """Expand the node's ancestors (adding deferred children), move the cursor to it, scroll to it."""
        view = self._view
        if view is None or node_id not in view.state.nodes:
            return False
        for ancestor in view.state.path(node_id)[:-1]:
            tree_ancestor = self.by_id.get(ancestor.id)
            if tree_ancestor is None:
                return False
            if not tree_ancestor.is_expanded:
                tree_ancestor.expand()
            self._materialize(ancestor.id)
        tree_node = self.by_id.get(node_id)
        if tree_node is None:
            return False
        self._tree_lines  # noqa: B018 - rebuild the line list now so the node has a line number
        self.move_cursor(tree_node)
        return True

    def action_expand_node(self) -> None:
        node = self.cursor_node
        if node is not None and node.allow_expand and not node.is_expanded:
            node.expand()
            if node.data is not None:
                self._materialize(node.data)

    def action_collapse_or_parent(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.is_expanded and node.children:
            node.collapse()
        elif node.parent is not None and node.parent is not self.root:
            self.move_cursor(node.parent)

    def get_label_width(self, node: TreeNode[str]) -> int:
        label = node.label  # always a Text here (labels.node_label); a str is measured the slow way
        width = label.cell_len if isinstance(label, Text) else Text(label).cell_len
        return width + 2  # + the expand icon; no need to render the label

    def spinner_targets(self, view: RunView) -> list[str]:
        return [node_id for node_id in view.running if node_id in self.by_id]
