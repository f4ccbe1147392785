"""GVSL in the browser: open a pair, Match pair in a child process (progress, Cancel), see
the fixed volume with the warped one over it and the deformation grid, click a point for the
similarity heatmap and best match in the other volume, download the result folder; pre-train or
fine-tune on folders under the data root in a child process (progress, loss curve, Cancel,
Resume) and match with the pre-trained model.

    python -m GVSLWeb --data-root /path/to/volumes          # http://127.0.0.1:8080
    python -m GVSLWeb --host 0.0.0.0 --token SECRET ...     # other hosts: open /?secret=SECRET

Views are Slicer's own slice views (slicer-core's MRML displayable managers) rendered off
screen by trame-slicer and streamed as images; the page's buttons call ``WebSession``.
Render with EGL (Mesa) when there is no display: ``VTK_DEFAULT_OPENGL_WINDOW`` is set to
``vtkEGLRenderWindow`` unless the user chose otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from trame.app import TrameApp  # noqa: E402
from trame.app.file_upload import ClientFile  # noqa: E402
from trame.decorators import change  # noqa: E402
from trame.widgets import html  # noqa: E402
from wslink.websocket import LinkProtocol  # noqa: E402
from trame.widgets import vuetify3 as v3  # noqa: E402
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout  # noqa: E402

from trame_slicer.core import LayoutManager, SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition  # noqa: E402

from .session import SessionError, WebSession, loss_curve_svg  # noqa: E402

QUERY_VIEW, TARGET_VIEW = "Red", "Yellow"  # = GVSLModuleLib.logic.HEATMAP_QUERY_VIEW and another slice view
POLL_INTERVAL_S = 0.25


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConnectionCounter(LinkProtocol):
    """Counts the server's open websocket connections (one per browser tab) and reports each change."""

    def __init__(self, on_change):
        super().__init__()
        self.clients, self.on_change = set(), on_change

    def onConnect(self, request, client_id):
        self.clients.add(client_id)
        self.on_change(len(self.clients))

    def onClose(self, client_id):
        self.clients.discard(client_id)
        self.on_change(len(self.clients))


class GVSLWebApp(TrameApp):
    def __init__(self, server=None, data_root=None, work_dir=None, checkpoint=None, device="auto"):
        super().__init__(server)
        self.slicer_app = SlicerApp()
        work_dir = Path(work_dir or tempfile.mkdtemp(prefix="gvsl-web-"))
        self.session = WebSession(self.slicer_app.scene, work_dir, data_root=data_root, checkpoint=checkpoint,
                                  device=device)
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        pair = Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.slice_view("Axial", label=QUERY_VIEW, color="#F34A33"),
            ViewLayoutDefinition.slice_view("Axial", label=TARGET_VIEW, color="#EFD64D"),
        ])
        self.layout_manager.register_layout("GVSL pair", pair)
        self.layout_manager.set_layout("GVSL pair")
        self._query_node = None
        self._poll_task = None
        self._train_task = None
        self._last_query = None
        self._init_state()
        # trame keeps one state for every browser tab of a server: say so while a second one is
        # connected (its clicks drive the same session), counted by open websockets, so a tab
        # that was killed without "beforeunload" counts out too.
        self._connections = ConnectionCounter(self._show_client_count)
        self.server.add_protocol_to_configure(lambda protocol: protocol.registerLinkProtocol(self._connections))
        self._build_ui()

    # ------------------------------------------------------------------ state
    def _init_state(self):
        s = self.state
        s.trame__title = "GVSL"
        s.update({"fixed_path": "", "moving_path": "", "fixed_upload": None, "moving_upload": None,
                  "fixed_name": "", "moving_name": "", "error": "", "match_state": "idle", "match_progress": 0,
                  "match_message": "", "summary": "", "overlay_opacity": 0.5, "show_grid": True,
                  "show_jacobian": False, "best_match": "", "query_point": "", "busy": False,
                  "data_root": str(self.session.data_root or ""),
                  "train_kind": "pretrain", "train_data": "", "train_labels": "", "train_classes": "",
                  "train_run": "run1", "train_iters": 1000, "train_patch": 64, "train_width": 0.25,
                  "train_spacing": 3.0, "train_init": "", "train_state": "idle", "train_progress": 0,
                  "train_message": "", "train_curve_svg": "", "train_checkpoint": "",
                  "match_model": str(self.session.checkpoint or "the shipped model"), "clients": 0,
                  "match_detail": "full"})

    def _show_client_count(self, count: int):
        # Connections open and close outside trame's state context: "with" pushes the change.
        with self.state:
            self.state.clients = count

    def _fail(self, error: Exception):
        self.state.error = str(error)

    def _views(self):
        return (self.slicer_app.view_manager.get_view(QUERY_VIEW), self.slicer_app.view_manager.get_view(TARGET_VIEW))

    def _show_inputs(self):
        fixed, moving = (self.session.volumes.get(r) for r in ("fixed", "moving"))
        query_view, target_view = self._views()
        for view, node in ((query_view, fixed), (target_view, moving)):
            if node is not None:
                view.set_background_volume_id(node.GetID())
                view.set_foreground_volume_id(None)
                view.fit_view_to_content()
                view.schedule_render()
        self.state.fixed_name = fixed.GetName() if fixed is not None else ""
        self.state.moving_name = moving.GetName() if moving is not None else ""

    # ------------------------------------------------------------------ inputs
    def open_path(self, role, typed):
        """``typed`` comes with the click (not read from the state): the click's message can reach
        the server before the text field's last state update does."""
        self.state.error = ""
        try:
            self.session.load_path(role, typed)
            self._show_inputs()
        except SessionError as error:
            self._fail(error)

    @change("fixed_upload", "moving_upload")
    def _on_upload(self, **kwargs):
        for role in ("fixed", "moving"):
            upload = self.state[f"{role}_upload"]
            if not upload:
                continue
            self.state[f"{role}_upload"] = None
            upload = upload[0] if isinstance(upload, list) else upload
            client_file = ClientFile(upload)
            self.state.error = ""
            try:
                self.session.load_upload(role, client_file.name, client_file.content)
                self._show_inputs()
            except SessionError as error:
                self._fail(error)

    def open_sample_pair(self):
        self.state.error = ""
        self.session.load_sample_pair()
        self._show_inputs()

    # ------------------------------------------------------------------- match
    def match_pair(self):
        self.state.error = ""
        try:
            status = self.session.start_match(refine_detail=self.state.match_detail)
        except SessionError as error:
            self._fail(error)
            return
        self.state.update({"match_state": status.state, "match_progress": 0, "match_message": status.message,
                           "summary": "", "best_match": ""})
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = asyncio.ensure_future(self._poll_match())

    def cancel_match(self):
        if self.session.job is not None and self.session.job.running:
            self.session.job.request_stop()  # the poll loop sees the child end (and kills it if overdue)
            self.state.match_message = "cancelling..."

    async def _follow(self, poll, show, prefix: str):
        """Poll a child job every POLL_INTERVAL_S and show its status until it ends; ``prefix``
        names its state keys (``PREFIX_state``, ``PREFIX_progress``, ``PREFIX_message``)."""
        while True:
            status = poll()
            with self.state:
                self.state[f"{prefix}_state"] = status.state
                self.state[f"{prefix}_progress"] = round(100 * status.progress)
                self.state[f"{prefix}_message"] = status.message
                if status.state == "failed":
                    self.state.error = status.message
                show(status)
            if status.state != "running":
                return
            await asyncio.sleep(POLL_INTERVAL_S)

    def _poll_match(self):
        def poll():
            if self.session.job is not None:
                self.session.job.kill_if_overdue(grace_s=20.0)
            return self.session.poll()

        def show(status):
            if status.state == "done":
                self.state.summary = status.summary
                self._show_result()

        return self._follow(poll, show, "match")

    def _show_result(self):
        result = self.session.result
        query_view, target_view = self._views()
        overlay = result.jacobianVolumeNode if self.state.show_jacobian else result.warpedVolumeNode
        query_view.set_background_volume_id(self.session.volumes["fixed"].GetID())
        query_view.set_foreground_volume_id(overlay.GetID())
        query_view.set_foreground_opacity(float(self.state.overlay_opacity))
        self.session.logic.showDeformationGrid(bool(self.state.show_grid))
        self._last_query = None  # a new answer: the same point queries again
        self._arm_query_point()
        for view in (query_view, target_view):
            view.schedule_render()

    @change("overlay_opacity", "show_grid", "show_jacobian")
    def _on_display_options(self, **kwargs):
        if self.session.result is not None:
            self._show_result()

    # -------------------------------------------------------------- training
    def start_training(self, resume=False, form=None):
        """``form`` (the fields' values) comes with the click, as for Open."""
        form = dict(form or {})
        self.state.error = ""
        try:
            status = self.session.start_training(
                form.get("kind", "pretrain"), form.get("data", ""), form.get("run", ""),
                labels=form.get("labels", ""), classes=form.get("classes", ""),
                iterations=form.get("iters", 1000), patch=form.get("patch", 64), width=form.get("width", 0.25),
                init=form.get("init", ""), resume=bool(resume), spacing_mm=form.get("spacing", 3.0))
        except SessionError as error:
            self._fail(error)
            return
        self.state.update({"train_state": status.state, "train_progress": 0, "train_message": status.message,
                           "train_curve_svg": "", "train_checkpoint": ""})
        if self._train_task is None or self._train_task.done():
            self._train_task = asyncio.ensure_future(self._poll_training())

    def cancel_training(self):
        self.state.train_message = self.session.cancel_training().message

    def use_trained_model(self):
        try:
            checkpoint = self.session.use_trained_model()
        except SessionError as error:
            self._fail(error)
            return
        self.state.match_model = checkpoint

    def _poll_training(self):
        def show(status):
            self.state.train_curve_svg = loss_curve_svg(status.losses)
            self.state.train_checkpoint = status.checkpoint or ""

        return self._follow(self.session.poll_training, show, "train")

    # --------------------------------------------------------------- heatmap
    def _arm_query_point(self):
        """A click in the fixed (Red) view places the query point; each placement queries.

        The logic's query list holds one point; Slicer's markups manager would answer a click on a
        full list by creating a new list, so here the list takes a second (clicked) point, the query
        point moves there and the extra point is dropped: every click queries, one point shows."""
        if self._query_node is None:
            self._query_node = self.session.logic.queryPointNode()
            self._query_node.SetMaximumNumberOfControlPoints(2)
            self._query_node.AddObserver(self._query_node.PointPositionDefinedEvent, self._on_query_point)
            self._query_node.AddObserver(self._query_node.PointEndInteractionEvent, self._on_query_point)
        self.slicer_app.markups_logic.place_node(self._query_node, persistent=True)

    def _on_query_point(self, node, _event=None):
        count = node.GetNumberOfControlPoints()
        if count == 0:
            return
        position = node.GetNthControlPointPositionWorld(count - 1)
        if count > 1:
            node.SetNthControlPointPositionWorld(0, *position)
        if self._last_query is not None and max(abs(a - b) for a, b in zip(position, self._last_query)) < 1e-6:
            return  # one click sends "position defined" and "interaction ended": query once
        self._last_query = tuple(position)
        self.query_at(position)
        # Not from inside the widget's own placement callback: on the next turn of the loop.
        asyncio.get_event_loop().call_soon(self._rearm_after_query)

    def _rearm_after_query(self):
        """Drop the clicked point (the query point has moved there) and make the query list the
        place target again: the query's best-match list, new to the scene, may have taken it."""
        node = self._query_node
        while node is not None and node.GetNumberOfControlPoints() > 1:
            node.RemoveNthControlPoint(node.GetNumberOfControlPoints() - 1)
        self.slicer_app.markups_logic.place_node(node, persistent=True)
        for view in self._views():
            view.schedule_render()

    def query_at(self, point_ras):
        """What a click at ``point_ras`` (RAS mm, in the fixed volume) shows."""
        try:
            answer = self.session.heatmap_at(point_ras, "fixed")
        except SessionError as error:
            self._fail(error)
            return None
        heatmap = answer["heatmap"]
        query_view, target_view = self._views()
        self.session.logic.showPointsInViews([query_view.get_view_node().GetID()],
                                             [target_view.get_view_node().GetID()])
        target_view.set_background_volume_id(self.session.volumes["moving"].GetID())
        target_view.set_foreground_volume_id(heatmap.GetID())
        target_view.set_foreground_opacity(0.6)
        best = answer["best_match_ras"]
        target_view.get_view_node().JumpSliceByCentering(*best)  # the slice through the best match
        with self.state:
            self.state.query_point = ", ".join(f"{v:.3f}" for v in point_ras)
            self.state.best_match = (", ".join(f"{v:.3f}" for v in best)
                                     + f"  (similarity {answer['best_similarity']:.3f})")
        for view in self._views():
            view.schedule_render()
        return answer

    # -------------------------------------------------------------- download
    async def download_result(self):
        try:
            return self.server.protocol.addAttachment(self.session.result_archive())
        except SessionError as error:
            self._fail(error)
            return None

    # -------------------------------------------------------------------- UI
    def _build_ui(self):
        ctrl = self.ctrl
        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            layout.title.set_text("GVSL: Match pair")
            with layout.drawer as drawer:
                drawer.width = 360
                with v3.VContainer(classes="pa-2"):
                    v3.VAlert(v_if=("error",), text=("error",), type="error", density="compact",
                              closable=True, id="gvsl-error", classes="mb-2")
                    v3.VAlert(v_if=("clients > 1",), type="warning", density="compact", id="gvsl-shared",
                              classes="mb-2",
                              text=("`${clients} browser tabs are connected to this server and share one "
                                    "session: the same volumes, Match pair and training. For a second user, "
                                    "start another gvsl web (another --port).`",))
                    html.Div("Data folder: {{ data_root || '(none: upload or use the sample pair)' }}",
                             classes="text-caption mb-2")
                    for role in ("fixed", "moving"):
                        html.Div(f"{role.capitalize()}: {{{{ {role}_name || '-' }}}}", classes="text-subtitle-2")
                        with v3.VRow(dense=True):
                            with v3.VCol(cols=8):
                                v3.VTextField(v_model=(f"{role}_path",), label="path under the data folder",
                                              density="compact", hide_details=True, id=f"gvsl-{role}-path")
                            with v3.VCol(cols=4):
                                v3.VBtn("Open", click=(self.open_path, f"['{role}', {role}_path]"), id=f"gvsl-{role}-open",
                                        size="small")
                        v3.VFileInput(v_model=(f"{role}_upload",), label=f"or upload the {role} volume",
                                      density="compact", hide_details=True, show_size=True,
                                      id=f"gvsl-{role}-upload")
                    v3.VBtn("Open sample pair", click=self.open_sample_pair, block=True, classes="my-2",
                            id="gvsl-sample")
                    # = gvsl.refine.DETAIL_MAX_VOXELS: full is the engine's default
                    v3.VSelect(v_model=("match_detail",), items=("['full', 'fast']",), label="refinement detail",
                               hint="full: the fixed volume's own voxel size, up to 8 M voxels (a 1 mm brain "
                                    "about 30 s on 2 CPU cores); fast: up to 1 M voxels (that brain at about "
                                    "2 mm, about 4 s)", persistent_hint=False, density="compact",
                               id="gvsl-match-detail"),
                    v3.VBtn("Match pair", click=self.match_pair, color="primary", block=True,
                            disabled=("match_state === 'running'",), id="gvsl-match")
                    v3.VProgressLinear(v_model=("match_progress",), height=18, classes="my-2",
                                       v_show=("match_state === 'running'",), id="gvsl-progress")
                    v3.VBtn("Cancel", click=self.cancel_match, block=True, v_show=("match_state === 'running'",),
                            id="gvsl-cancel")
                    html.Div("{{ match_state }}: {{ match_message }}", classes="text-caption my-1",
                             id="gvsl-status")
                    html.Pre("{{ summary }}", v_show=("summary",), classes="text-caption", id="gvsl-summary",
                             style="white-space: pre-wrap")
                    v3.VSlider(v_model=("overlay_opacity",), min=0, max=1, step=0.05, label="overlay",
                               hide_details=True, density="compact")
                    v3.VCheckbox(v_model=("show_grid",), label="deformation grid", hide_details=True,
                                 density="compact")
                    v3.VCheckbox(v_model=("show_jacobian",), label="Jacobian instead of warped", hide_details=True,
                                 density="compact")
                    html.Div("Click in the left (fixed) view: the right view shows where that feature "
                             "matches in the moving volume.", classes="text-caption my-1")
                    html.Div("query {{ query_point }} -> best match {{ best_match }}", v_show=("best_match",),
                             classes="text-caption", id="gvsl-best-match")
                    v3.VBtn("Download result (.zip)", block=True, classes="mt-2", id="gvsl-download",
                            disabled=("match_state !== 'done'",),
                            click=f"utils.download('gvsl_match.zip', trigger('{ctrl.trigger_name(self.download_result)}'),"
                                  " 'application/zip')")
                    html.Div("Match pair uses: {{ match_model }}", classes="text-caption mt-1", id="gvsl-match-model")
                    v3.VDivider(classes="my-3")
                    self._build_training_ui()
            with layout.content:
                with html.Div(style="height: calc(100vh - 64px); position: relative;"):
                    self.layout_manager.initialize_layout_grid(layout)
        self.ui = layout


    def _build_training_ui(self):
        html.Div("Train (folders under the data folder; runs go to the work folder's runs/)",
                 classes="text-subtitle-2")
        with v3.VBtnToggle(v_model=("train_kind",), mandatory=True, density="compact", classes="my-1"):
            v3.VBtn("Pre-train", value="pretrain", size="small", id="gvsl-train-kind-pretrain")
            v3.VBtn("Fine-tune", value="finetune", size="small", id="gvsl-train-kind-finetune")
        fields = [("train_data", "volumes folder (fine-tune: images)", "gvsl-train-data", None),
                  ("train_labels", "label maps folder", "gvsl-train-labels", "train_kind === 'finetune'"),
                  ("train_classes", "class names, comma-separated", "gvsl-train-classes",
                   "train_kind === 'finetune'"),
                  ("train_run", "run name", "gvsl-train-run", None),
                  ("train_init", "start from checkpoint (optional: runs/NAME/... or a file)", "gvsl-train-init", None)]
        for key, label, element_id, shown in fields:
            v3.VTextField(v_model=(key,), label=label, density="compact", hide_details=True, id=element_id,
                          classes="my-1", **({"v_show": (shown,)} if shown else {}))
        with v3.VRow(dense=True):
            for key, label, element_id in (("train_iters", "iterations", "gvsl-train-iters"),
                                           ("train_patch", "patch", "gvsl-train-patch"),
                                           ("train_width", "width", "gvsl-train-width"),
                                           ("train_spacing", "mm", "gvsl-train-spacing")):
                with v3.VCol(cols=3):
                    v3.VTextField(v_model=(key,), label=label, density="compact", hide_details=True, id=element_id)
        form = ("{kind: train_kind, data: train_data, labels: train_labels, classes: train_classes, run: train_run,"
                " init: train_init, iters: train_iters, patch: train_patch, width: train_width,"
                " spacing: train_spacing}")
        with v3.VRow(dense=True, classes="my-1"):
            with v3.VCol(cols=6):
                v3.VBtn("Start", click=(self.start_training, f"[false, {form}]"), block=True, color="primary",
                        disabled=("train_state === 'running'",), id="gvsl-train-start")
            with v3.VCol(cols=6):
                v3.VBtn("Resume", click=(self.start_training, f"[true, {form}]"), block=True,
                        disabled=("train_state === 'running'",), id="gvsl-train-resume")
        v3.VProgressLinear(v_model=("train_progress",), height=18, classes="my-1",
                           v_show=("train_state === 'running'",), id="gvsl-train-progress")
        v3.VBtn("Cancel training", click=self.cancel_training, block=True, v_show=("train_state === 'running'",),
                id="gvsl-train-cancel")
        html.Div("{{ train_state }}: {{ train_message }}", classes="text-caption my-1", id="gvsl-train-status")
        html.Div(v_html=("train_curve_svg",), id="gvsl-train-curve")
        html.Div("checkpoint: {{ train_checkpoint }}", v_show=("train_checkpoint",), classes="text-caption",
                 id="gvsl-train-checkpoint")
        v3.VBtn("Use this model for Match pair", click=self.use_trained_model, block=True, size="small",
                v_show=("train_kind === 'pretrain' && train_checkpoint && train_state !== 'running'",),
                id="gvsl-train-use")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m GVSLWeb", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--data-root", help="the only folder typed paths are read from")
    parser.add_argument("--work-dir", help="where uploads and results go (default: a new temporary folder)")
    parser.add_argument("--checkpoint", help="GVSL model (default: the shipped one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--token", default=os.environ.get("GVSL_WEB_TOKEN"),
                        help="access token, required when --host is not this machine (clients open /?secret=TOKEN)")
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.token:
        parser.error(f"--host {args.host} serves beyond this machine: give an access token with --token "
                     f"(or GVSL_WEB_TOKEN)")
    if args.data_root and not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root}: not a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    app = GVSLWebApp(data_root=args.data_root, work_dir=args.work_dir, checkpoint=args.checkpoint,
                     device=args.device)
    server_argv = ["--host", args.host, "--port", str(args.port), "--server"]
    if args.token:
        server_argv += ["--authKey", args.token]
    sys.argv = [sys.argv[0], *server_argv]  # trame reads its own options from the command line
    app.server.start(host=args.host, port=args.port, open_browser=False)


if __name__ == "__main__":
    main()
