"""GVSL: Geometric Visual Similarity Learning in 3D Slicer.

A thin Qt panel over ``GVSLModuleLib.logic.GVSLLogic`` (MRML only) and the ``gvsl``
engine. Long work runs in ``PythonSlicer -m gvsl ...`` child processes whose JSON events
a ``qt.QTimer`` drains, so Slicer stays responsive.
"""
import logging
import os
import sys
import tempfile
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import (Choice, GuiConnector, WithinRange, parameterNodeGuiConnector,
                                         parameterNodeWrapper, unannotatedType)
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _ensure_engine_on_path():
    """Installed, ``gvsl`` sits beside this file; in a source checkout it is in ../GVSLExtension."""
    for candidate in (MODULE_DIR, os.path.join(MODULE_DIR, os.pardir, "GVSLExtension")):
        candidate = os.path.normpath(candidate)
        if os.path.isdir(os.path.join(candidate, "gvsl")) and candidate not in sys.path:
            sys.path.insert(0, candidate)
            return


_ensure_engine_on_path()


def resource_path(relative: str) -> str:
    """Installed: <module>/Resources; source checkout: the repository's top-level Resources."""
    for base in (os.path.join(MODULE_DIR, "Resources"), os.path.join(MODULE_DIR, os.pardir, "Resources")):
        path = os.path.normpath(os.path.join(base, relative))
        if os.path.exists(path):
            return path
    raise FileNotFoundError(relative)


#
# GVSLModule
#


class GVSLModule(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GVSL")
        # The category's translation context is the one of Slicer's built-in category names.
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["GVSL for 3D Slicer developers"]
        self.parent.helpText = _("""
Pre-train, inspect and fine-tune 3D networks with Geometric Visual Similarity Learning.
<b>Match pair</b> shows the network's affine and deformable correspondence as transforms, the
warped volume, the Jacobian determinant and feature-similarity heatmaps. Pre-training and
fine-tuning run in a background process. See the project README.
""")
        self.parent.acknowledgementText = _("""
Method: Y. He, G. Yang, R. Ge, Y. Chen, J.-L. Coatrieux, B. Wang, S. Li.
<i>Geometric Visual Similarity Learning in 3D Medical Image Self-supervised Pre-training</i>.
CVPR 2023. Sample data: slicerio's CTChest4 and nilearn's MNI152 template.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def sampleCacheFolder() -> str:
    """Where SampleDataLogic.downloadFileIntoCache looks for a sample's file (5.6 to 5.10)."""
    return slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory()


def registerSampleData():
    """Two Sample Data module entries, generated on this computer (nothing is downloaded).
    The generated files are written into Slicer's remote cache directory under the entries'
    file names, where ``SampleData.downloadSample("GVSLChestCT")`` finds them (it downloads
    only files that are not there): at startup by a background child process if they are
    missing and the engine's packages are installed, and by the Sample Data buttons
    (``customDownloader``). Scripts can also call ``GVSLModuleLogic().core.loadSamplePair()``."""
    import SampleData
    from GVSLModuleLib import dependencies
    from GVSLModuleLib.logic import SAMPLE_FILE_NAMES, SAMPLE_NAMES, missing_sample_files

    def load(source):
        if not dependencies.engine_ready():
            slicer.util.errorDisplay(_("The GVSL samples need Python packages that are not installed yet: open "
                                       "the GVSL module and click Install."))
            return []
        with slicer.util.tryWithErrorDisplay(_("Generating the GVSL sample failed."), waitCursor=True):
            return [GVSLModuleLogic().core.loadSampleVolume(source.sampleName, sampleCacheFolder())]

    for name in SAMPLE_NAMES:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="GVSL", sampleName=name, uris=f"gvsl-generated:{name}", fileNames=SAMPLE_FILE_NAMES[name],
            nodeNames=name, thumbnailFileName=resource_path("Icons/GVSLModule.png"), loadFileType="VolumeFile",
            customDownloader=load)
    try:
        folder = sampleCacheFolder()
        if missing_sample_files(folder) and dependencies.engine_ready():
            writeSampleFilesInBackground(folder)
    except Exception:  # never break Slicer's startup for sample data
        logging.exception("GVSL: could not prepare the sample data files")


def writeSampleFilesInBackground(folder):
    """Generate the sample files in a child process (it imports torch; Slicer does not)."""
    import subprocess
    from GVSLModuleLib.jobs import python_executable
    env = dict(os.environ)
    paths = [os.path.dirname(os.path.abspath(__file__))]
    import gvsl
    paths.append(os.path.dirname(os.path.dirname(os.path.abspath(gvsl.__file__))))
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    code = "import sys\nfrom GVSLModuleLib.logic import write_sample_files\nwrite_sample_files(sys.argv[1])\n"
    subprocess.Popen([python_executable(), "-c", code, folder], env=env, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#
# Parameters
#


@parameterNodeGuiConnector
class GVSLPathLineEditToStrConnector(GuiConnector):
    """``ctkPathLineEdit`` <-> ``str``. Slicer's own ctkPathLineEdit connector takes only
    pathlib types (5.6 to 5.10), whose empty value ``Path("")`` is ``Path(".")``: shown as
    "." and truthy. With ``str``, an empty field stays "" and the panel tests ``if path:``."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str

    @staticmethod
    def create(widget, datatype):
        if GVSLPathLineEditToStrConnector.canRepresent(widget, datatype):
            return GVSLPathLineEditToStrConnector(widget)
        return None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self):
        return self._widget.currentPath

    def write(self, value) -> None:
        # Every keystroke comes back here through the parameter node; setting the same text
        # again would move the cursor to the end and clear undo (ctkPathLineEdit.setCurrentPath).
        if value != self._widget.currentPath:
            self._widget.currentPath = value


@parameterNodeWrapper
class GVSLModuleParameterNode:
    checkpointPath: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    preset: Annotated[str, Choice(["auto", "ct", "mr"])] = "auto"
    refineIterations: Annotated[int, WithinRange(-1, 100000)] = -1  # -1: the engine's default schedule
    similarity: Annotated[str, Choice(["lncc", "mind"])] = "lncc"
    timeBudgetSeconds: Annotated[float, WithinRange(0.0, 86400.0)] = 0.0  # 0: no budget
    refineDetail: Annotated[str, Choice(["full", "fast"])] = "full"  # = gvsl.refine.DETAIL_MAX_VOXELS
    precision: Annotated[str, Choice(["auto", "fp32", "bf16", "fp16"])] = "auto"
    showTransformGrid: bool = False
    queryIn: Annotated[str, Choice(["fixed", "moving"])] = "fixed"
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    pretrainDataFolder: str = ""
    pretrainUseSceneVolumes: bool = False
    pretrainOutputFolder: str = ""
    pretrainPatch: Annotated[int, WithinRange(32, 256)] = 96
    pretrainIterations: Annotated[int, WithinRange(1, 10000000)] = 10000
    pretrainBatch: Annotated[int, WithinRange(1, 64)] = 1
    pretrainWidth: Annotated[float, WithinRange(0.125, 2.0)] = 1.0
    pretrainLearningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0001
    finetuneImagesFolder: str = ""
    finetuneLabelsFolder: str = ""
    finetuneClasses: str = ""
    finetuneInit: str = ""
    finetuneMode: Annotated[str, Choice(["full", "linear"])] = "full"
    finetuneOutputFolder: str = ""
    finetuneIterations: Annotated[int, WithinRange(1, 10000000)] = 2000
    finetunePatch: Annotated[int, WithinRange(32, 256)] = 96
    segmentVolume: vtkMRMLScalarVolumeNode
    segmentCheckpoint: str = ""


#
# Widget
#


class GVSLModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.jobs = {}  # "match" | "pretrain" | "finetune" | "segment" -> (GVSLJob, on_done)
        self.queryNode = None
        self.lossTables = {}  # job name -> its loss curve's table node
        self.deviceProbe = None
        # Installing packages runs Qt's event loop for every line of pip's output, so clicks
        # arrive during it; and a modal error dialog inside pollJobs runs the poll timer again.
        self.installing = False
        self.polling = False
        self.pollTimer = self.heatmapTimer = self.probeTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resource_path("UI/GVSLModule.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GVSLModuleLogic()  # imports neither torch nor MONAI: those may not be installed yet

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.matchButton.connect("clicked(bool)", self.onMatch)
        self.ui.cancelMatchButton.connect("clicked(bool)", lambda: self.stopJob("match"))
        self.ui.showGridCheckBox.connect("toggled(bool)", self.onShowGrid)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.onHeatmapOpacity)
        self.ui.pretrainStartButton.connect("clicked(bool)", lambda: self.onPretrain(resume=False))
        self.ui.pretrainResumeButton.connect("clicked(bool)", lambda: self.onPretrain(resume=True))
        self.ui.pretrainStopButton.connect("clicked(bool)", lambda: self.stopJob("pretrain"))
        self.ui.exportSceneSegmentationsButton.connect("clicked(bool)", self.onExportSceneSegmentations)
        self.ui.finetuneStartButton.connect("clicked(bool)", lambda: self.onFinetune(resume=False))
        self.ui.finetuneResumeButton.connect("clicked(bool)", lambda: self.onFinetune(resume=True))
        self.ui.finetuneStopButton.connect("clicked(bool)", lambda: self.stopJob("finetune"))
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelSegmentButton.connect("clicked(bool)", lambda: self.stopJob("segment"))

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(200)
        self.pollTimer.connect("timeout()", self.pollJobs)
        self.heatmapTimer = qt.QTimer()  # coalesces drag events into one query
        self.heatmapTimer.setSingleShot(True)
        self.heatmapTimer.setInterval(30)
        self.heatmapTimer.connect("timeout()", self.updateHeatmap)

        self.probeTimer = qt.QTimer()  # polls the device probe's child process
        self.probeTimer.setInterval(250)
        self.probeTimer.connect("timeout()", self.pollDeviceProbe)

        self.ui.queryPointPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.queryPointPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.initializeParameterNode()
        self.updateDeviceLabel()
        self.updateSelectorFilters()
        self.updateButtons()

    def cleanup(self):
        self.setParameterNode(None)  # first: it removes its own observers
        self.removeObservers()
        for timer in (self.pollTimer, self.heatmapTimer, self.probeTimer):
            if timer is not None:
                timer.stop()
        self.killDeviceProbe()
        self.stopAllJobs(grace_s=10)  # Slicer is closing: then each job's process tree goes
        self.logic.core.removeTemporaryFolders(keepLastMatch=False)  # the jobs' inputs and results

    def stopAllJobs(self, grace_s=None):
        """Ask every job to stop, all at once (each child saves while the others do). With
        ``grace_s`` wait for them (killing overdue ones); else the poll timer watches them."""
        for job, _on_done in self.jobs.values():
            job.request_stop()
        if grace_s is not None:
            for job, _on_done in self.jobs.values():
                job.stop(grace_s=grace_s)

    def enter(self):
        self.initializeParameterNode()
        self.updateSelectorFilters()

    def exit(self):
        # The GUI stays connected to the parameter node (see setParameterNode): Slicer 5.6 to
        # 5.10 leave a parameter node observer behind on every connectGui/disconnectGui pair.
        pass

    def onSceneStartClose(self, caller, event):
        # The scene's nodes go: no job may import into the next scene, and none keeps running.
        for job, _on_done in self.jobs.values():
            job.sceneClosed = True
        self.stopAllJobs()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def parameterWidgets(self):
        """{parameter name: widget} of the widgets the .ui binds (SlicerParameterName)."""
        widgets = {}
        for widget in vars(self.ui).values():  # slicer.util.childWidgetVariables: one attribute per widget
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name:
                widgets[name] = widget
        return widgets

    def setParameterNode(self, inputParameterNode):
        """Connect the GUI once per parameter node. ``connectGui`` returns None on Slicer 5.6
        and 5.8 (so disconnectGui(None) disconnected nothing and bindings piled up on every
        module entry): ``connectParametersToGui`` returns the tag on 5.6 to 5.10."""
        same = (inputParameterNode is not None and self._parameterNode is not None
                and inputParameterNode.parameterNode is self._parameterNode.parameterNode)
        if same and self._parameterNodeGuiTag is not None:
            return
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self.parameterWidgets())
            self.addObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    def onNodeAdded(self, caller=None, event=None):
        qt.QTimer.singleShot(0, self.updateSelectorFilters)  # attributes are set after NodeAdded

    def updateSelectorFilters(self):
        """The volume selectors list plain scalar volumes only (``showChildNodeTypes`` false
        in the .ui: no label maps) and never GVSL's own outputs."""
        if self.logic is None:
            return
        hidden = self.logic.core.outputVolumeIDs()
        for selector in (self.ui.fixedVolumeSelector, self.ui.movingVolumeSelector, self.ui.segmentVolumeSelector):
            selector.sortFilterProxyModel().hiddenNodeIDs = hidden  # a Q_PROPERTY (5.6 to 5.10)

    def updateButtons(self, caller=None, event=None):
        p = self._parameterNode
        running = {name for name, (job, _on_done) in self.jobs.items() if job.running}
        # A job asked to stop is still running while it saves; its Stop button has done its part.
        stoppable = {name for name, (job, _on_done) in self.jobs.items() if job.running and not job.stop_requested}
        idle = not self.installing
        ready = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
        self.ui.installDependenciesButton.enabled = idle
        self.ui.matchButton.enabled = idle and ready and "match" not in running
        self.ui.cancelMatchButton.enabled = "match" in stoppable
        self.ui.pretrainStartButton.enabled = idle and "pretrain" not in running
        self.ui.pretrainResumeButton.enabled = idle and "pretrain" not in running
        self.ui.pretrainStopButton.enabled = "pretrain" in stoppable
        self.ui.finetuneStartButton.enabled = idle and "finetune" not in running
        self.ui.finetuneResumeButton.enabled = idle and "finetune" not in running
        self.ui.finetuneStopButton.enabled = "finetune" in stoppable
        self.ui.segmentButton.enabled = (idle and bool(p and p.segmentVolume and p.segmentCheckpoint)
                                         and "segment" not in running)
        self.ui.cancelSegmentButton.enabled = "segment" in stoppable

    # ------------------------------------------------------------ dependencies
    def updateDeviceLabel(self):
        """The devices torch sees, asked of a child process (dependencies.DeviceProbe): a
        broken torch cannot break the panel, and torch's DLLs stay out of Slicer."""
        from GVSLModuleLib import dependencies
        if not dependencies.torch_available():
            self.ui.deviceLabel.text = _("PyTorch is not installed: click Install")
            return
        self.ui.deviceLabel.text = _("Detecting devices ...")
        self.killDeviceProbe()
        try:
            self.deviceProbe = dependencies.DeviceProbe().start()
        except OSError as exc:
            self.ui.deviceLabel.text = _("Could not start PyTorch's device check: ") + str(exc)
            return
        self.probeTimer.start()

    def killDeviceProbe(self):
        probe = self.deviceProbe
        if probe is not None and probe.process is not None and probe.result is None:
            probe.process.kill()

    def pollDeviceProbe(self):
        answer = self.deviceProbe.poll() if self.deviceProbe is not None else ("", True)
        if answer is None:
            return
        self.probeTimer.stop()
        if answer[0]:
            self.ui.deviceLabel.text = answer[0]

    def onInstallDependencies(self):
        self.ensureDependencies(ask=True)

    def ensureDependencies(self, ask=True) -> bool:
        if self.installing:  # a click that arrived while pip's output was being shown
            return False
        self.installing = True
        self.updateButtons()
        try:
            return self._ensureDependencies(ask)
        finally:
            self.installing = False
            self.updateButtons()

    def _ensureDependencies(self, ask) -> bool:
        from GVSLModuleLib import dependencies
        missing = dependencies.missing_packages()
        need_torch = not dependencies.torch_available()
        if not missing and not need_torch:
            return True
        unsupported = dependencies.unsupported_python_message()
        if unsupported:
            slicer.util.errorDisplay(unsupported)
            return False
        what = (["torch (through the PyTorch extension)"] if need_torch else []) + missing
        if ask and not slicer.util.confirmOkCancelDisplay(
                _("GVSL needs these Python packages: ") + ", ".join(what) + _(". Install them now?")):
            return False
        try:
            with slicer.util.WaitCursor():
                if need_torch:
                    try:
                        import PyTorchUtils
                    except ImportError:
                        slicer.util.errorDisplay(_("Install the PyTorch extension from the Extension Manager first."))
                        return False
                    torch = dependencies.run_capturing_output(
                        PyTorchUtils.PyTorchUtilsLogic().installTorch, askConfirmation=False,
                        torchVersionRequirement=dependencies.TORCH_REQUIREMENT)
                    if torch is None:
                        self.ui.deviceLabel.text = _("PyTorch was not installed")
                        return False
                if missing:
                    # the constraints pin the torch just installed: MONAI cannot replace it
                    dependencies.run_capturing_output(slicer.util.pip_install,
                                                      dependencies.pip_install_arguments(missing))
        except Exception as exc:  # pip's CalledProcessError, or anything the installer raised
            logging.exception("GVSL: installing Python packages failed")
            message = dependencies.install_failure_message(exc, what)
            self.ui.deviceLabel.text = message.splitlines()[0]
            slicer.util.errorDisplay(message)
            return False
        self.updateDeviceLabel()
        return True

    # --------------------------------------------------------------- match pair
    def onMatch(self):
        if not self.ensureDependencies():
            return
        # Errors while preparing the job (writing the inputs, a volume under a non-linear
        # transform) are shown, not only logged to the Python console.
        with slicer.util.tryWithErrorDisplay(_("GVSL could not start Match pair."), waitCursor=True):
            p = self._parameterNode
            fixed, moving = p.fixedVolume, p.movingVolume
            notes = self.logic.core.matchInputNotes(fixed, moving)
            job, folder = self.logic.core.matchJob(
                fixed, moving, p.checkpointPath or None, p.device, p.preset,
                refineIterations=None if p.refineIterations < 0 else p.refineIterations, similarity=p.similarity,
                timeBudgetSeconds=p.timeBudgetSeconds or None, precision=p.precision, refineDetail=p.refineDetail)

            def done():
                from GVSLModuleLib.logic import match_summary
                result = self.logic.core.importMatchFolder(folder, fixed, moving)
                slicer.util.setSliceViewerLayers(background=fixed, foreground=result.warpedVolumeNode,
                                                 foregroundOpacity=0.5, fit=True)
                self.onShowGrid(self.ui.showGridCheckBox.checked)
                self.ui.metricsLabel.text = "\n".join([match_summary(result.metrics), *notes])
                self.ensureQueryNode()
                self.updateSelectorFilters()

            # The metrics label says "stopping ..." after Cancel and "stopped" if nothing was kept.
            self.startJob("match", job, self.ui.matchProgressBar, done, self.ui.metricsLabel)
            if notes:
                self.ui.metricsLabel.text = "\n".join(notes)

    def onShowGrid(self, show):
        self.logic.core.showDeformationGrid(bool(show))

    # ------------------------------------------------------------------ heatmap
    def ensureQueryNode(self):
        if self.queryNode is None or self.queryNode.GetScene() is None:
            self.queryNode = self.logic.core.queryPointNode()  # one control point at most
            self.addObserver(self.queryNode, slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self.onQueryMoved)
            self.addObserver(self.queryNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onQueryMoved)
        self.ui.queryPointPlaceWidget.setCurrentNode(self.queryNode)

    def onQueryMoved(self, caller=None, event=None):
        self.heatmapTimer.start()

    def updateHeatmap(self):
        from GVSLModuleLib.logic import HEATMAP_QUERY_VIEW
        p = self._parameterNode
        if self.queryNode is None or self.queryNode.GetNumberOfDefinedControlPoints() == 0 or not p:
            return
        query_volume = p.fixedVolume if p.queryIn == "fixed" else p.movingVolume
        point = [0.0, 0.0, 0.0]
        self.queryNode.GetNthControlPointPositionWorld(0, point)
        try:
            heatmap, best = self.logic.core.similarityHeatmap(point, query_volume)
        except Exception as exc:  # shown, not raised: this runs on every drag
            logging.exception("GVSL heatmap")
            self.ui.heatmapLabel.text = f"{type(exc).__name__}: {exc}"
            return
        self.logic.core.updateBestMatchMarkup(best)
        layoutManager = slicer.app.layoutManager()
        layouts = slicer.vtkMRMLLayoutNode
        if layoutManager and layoutManager.layout not in (layouts.SlicerLayoutConventionalView,
                                                          layouts.SlicerLayoutFourUpView,
                                                          layouts.SlicerLayoutSideBySideView):
            # The query view and a target view must both be on screen.
            layoutManager.setLayout(layouts.SlicerLayoutSideBySideView)
        self.logic.core.showHeatmapInViews(query_volume, heatmap, p.heatmapOpacity)
        self.updateSelectorFilters()
        self.ui.heatmapLabel.text = (
            f"query point in the {HEATMAP_QUERY_VIEW} view ({query_volume.GetName()}); "
            f"best match R {best[0]:.1f}, A {best[1]:.1f}, S {best[2]:.1f} "
            f"(similarity {heatmap.GetAttribute('GVSL.bestSimilarity')})")

    def onHeatmapOpacity(self, value):
        self.logic.core.setHeatmapOpacity(value)

    # ------------------------------------------------------------------ training
    def onPretrain(self, resume=False):
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("GVSL could not start pre-training."), waitCursor=True):
            self._startPretrain(resume)

    def _startPretrain(self, resume):
        from GVSLModuleLib.logic import absolute_path
        p = self._parameterNode
        if not p.pretrainOutputFolder:
            slicer.util.errorDisplay(_("Choose an output folder."))
            return
        data = p.pretrainDataFolder
        if p.pretrainUseSceneVolumes:
            volumes = self.logic.core.trainingVolumeNodes()
            if len(volumes) < 2:
                slicer.util.errorDisplay(_("Pre-training needs at least two scalar volumes in the scene "
                                           "(label maps and GVSL's own results are not used)."))
                return
            data = self.logic.core.exportVolumes(volumes, os.path.join(absolute_path(p.pretrainOutputFolder), "scene_volumes"))
        elif not data:
            slicer.util.errorDisplay(_("Choose a data folder or use the scene's volumes."))
            return
        job = self.logic.core.pretrainJob(data, p.pretrainOutputFolder, p.pretrainPatch, p.pretrainIterations,
                                          p.pretrainBatch, p.pretrainWidth, p.pretrainLearningRate, p.device, resume)
        self.startLossCurve("pretrain", p.pretrainOutputFolder, "GVSL pre-training loss")
        self.startJob("pretrain", job, self.ui.pretrainProgressBar, None, self.ui.pretrainStatusLabel)

    def onExportSceneSegmentations(self):
        # Needs neither torch nor MONAI (GVSLModuleLib.mrml_io is torch-free): no install check.
        with slicer.util.tryWithErrorDisplay(_("GVSL could not export the scene's segmentations."),
                                             waitCursor=True):
            self._exportSceneSegmentations()

    def _exportSceneSegmentations(self):
        pairs = []
        for seg in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            ref = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
            if ref is not None and ref.IsA("vtkMRMLScalarVolumeNode"):
                pairs.append((ref, seg))
        if not pairs:
            slicer.util.errorDisplay(_("No segmentation in the scene references a volume."))
            return
        folder = tempfile.mkdtemp(prefix="gvsl-labelled-")
        images, labels, classes = self.logic.core.exportTrainingSet(pairs, folder)
        p = self._parameterNode
        p.finetuneImagesFolder, p.finetuneLabelsFolder, p.finetuneClasses = images, labels, ",".join(classes)

    def onFinetune(self, resume=False):
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("GVSL could not start fine-tuning."), waitCursor=True):
            self._startFinetune(resume)

    def _startFinetune(self, resume):
        from GVSLModuleLib.logic import absolute_path
        p = self._parameterNode
        if not (p.finetuneImagesFolder and p.finetuneLabelsFolder and p.finetuneOutputFolder):
            slicer.util.errorDisplay(_("Choose the images, labels and output folders."))
            return
        classes = [c.strip() for c in p.finetuneClasses.split(",") if c.strip()]
        job = self.logic.core.finetuneJob(p.finetuneImagesFolder, p.finetuneLabelsFolder, p.finetuneOutputFolder,
                                          classes, p.finetuneInit or "scratch", p.finetuneMode, p.finetunePatch,
                                          p.finetuneIterations, device=p.device, resume=resume)
        self.startLossCurve("finetune", p.finetuneOutputFolder, "GVSL fine-tuning loss")
        best = os.path.join(absolute_path(p.finetuneOutputFolder), "checkpoints", "best.pt")

        def done():
            p.segmentCheckpoint = best

        self.startJob("finetune", job, self.ui.finetuneProgressBar, done, self.ui.finetuneStatusLabel)

    def onSegment(self):
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("GVSL could not start Segment."), waitCursor=True):
            p = self._parameterNode
            volume = p.segmentVolume
            job, labels_path = self.logic.core.segmentJob(volume, p.segmentCheckpoint, p.device)

            def done():
                self.logic.core.importSegmentation(labels_path, volume)

            self.startJob("segment", job, self.ui.segmentProgressBar, done, self.ui.segmentStatusLabel)

    # --------------------------------------------------------------------- jobs
    def startJob(self, name, job, progressBar, onDone=None, statusLabel=None):
        job.start()
        job.progressBar, job.statusLabel, job.sceneClosed = progressBar, statusLabel, False
        progressBar.setValue(0)
        if statusLabel is not None:
            statusLabel.text = _("starting ...")
        self.jobs[name] = (job, onDone)
        self.pollTimer.start()
        self.updateButtons()

    # Seconds a child may take to save and exit after Stop before its process tree is killed.
    # Match finishes its refinement step, then computes and writes its result; segment ends
    # after the current batch of sliding windows.
    STOP_GRACE_S = {"match": 120, "segment": 30, "pretrain": 120, "finetune": 120}
    # Jobs whose stopped child still wrote a result worth importing (refinement so far).
    KEEPS_STOPPED_RESULT = ("match",)

    def stopJob(self, name):
        """Non-blocking: writes the job's stop request; the poll timer watches the child save
        and exit (or kills its process tree when overdue)."""
        if name in self.jobs:
            job = self.jobs[name][0]
            job.request_stop()
            if job.statusLabel is not None:
                job.statusLabel.text = _("stopping: the job saves, then exits ...")
            self.updateButtons()

    def pollJobs(self):
        if self.polling:  # called again from inside a modal dialog that the outer call opened
            return
        self.polling = True
        try:
            self._pollJobs()
        finally:
            self.polling = False
        if not self.jobs:
            self.pollTimer.stop()
        self.updateButtons()

    def _pollJobs(self):
        for name, (job, onDone) in list(self.jobs.items()):
            for event in job.poll():
                kind = event.get("event")
                if kind == "progress" and event.get("total"):
                    job.progressBar.setValue(int(100 * event["step"] / event["total"]))
                    if job.statusLabel is not None:
                        eta = event.get("eta_s") or 0
                        loss = ", ".join(f"{k} {v:.4f}" for k, v in event.get("loss", {}).items())
                        job.statusLabel.text = f"step {event['step']}/{event['total']}  {loss}  ETA {eta / 60:.1f} min"
                    if name in ("pretrain", "finetune") and event.get("loss"):
                        self.appendLoss(name, event["step"], event["loss"])
                elif kind == "validation" and job.statusLabel is not None:
                    job.statusLabel.text = f"validation Dice {event['mean_dice']:.3f} at step {event['step']}"
            job.kill_if_overdue(self.STOP_GRACE_S.get(name, 60))
            if not job.running:
                job.poll()
                job.finish()  # anything the child left in its process tree
                self.jobs.pop(name, None)
                error = job.error_message()
                done_event = job.last("done") or {}
                kept = (job.stop_requested and not job.killed and not job.sceneClosed and job.returncode == 0
                        and name in self.KEEPS_STOPPED_RESULT and done_event.get("files"))
                if job.sceneClosed:
                    pass  # the scene it worked for is gone: nothing to show or import
                elif kept:
                    self._runOnDone(name, onDone)  # stopped during refinement: the answer it reached
                elif job.stop_requested:
                    if job.statusLabel is not None:
                        done = done_event
                        job.statusLabel.text = (_("stopped and killed (it did not exit in time)") if job.killed else
                                                _("stopped") + (f" at step {done['step']}" if "step" in done else ""))
                elif error:
                    if job.statusLabel is not None:
                        job.statusLabel.text = _("failed: ") + error.splitlines()[0]
                    slicer.util.errorDisplay(f"GVSL {name} failed:\n{error}")
                elif job.returncode == 0:
                    if job.statusLabel is not None:
                        job.statusLabel.text = _("done")
                    self._runOnDone(name, onDone)
                job.progressBar.setValue(100 if job.returncode == 0 and not job.stop_requested else 0)

    @staticmethod
    def _runOnDone(name, onDone):
        try:
            if onDone is not None:
                onDone()
        except Exception as exc:
            logging.exception("GVSL")
            slicer.util.errorDisplay(f"GVSL {name}: {exc}")

    def startLossCurve(self, name, runFolder, title):
        table, chart = self.logic.core.lossCurve(runFolder, title)
        self.lossTables[name] = table  # per job: pre-training and fine-tuning may run at once
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    def appendLoss(self, name, step, losses):
        self.logic.core.appendLoss(self.lossTables.get(name), step, losses)

#
# Logic
#


class GVSLModuleLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic wrapper: the parameter node, plus ``core``, the Qt-free
    ``GVSLLogic`` on ``slicer.mrmlScene``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        from GVSLModuleLib.logic import GVSLLogic
        self.core = GVSLLogic(slicer.mrmlScene)

    def getParameterNode(self):
        return GVSLModuleParameterNode(super().getParameterNode())


#
# Test
#


class GVSLModuleTest(ScriptedLoadableModuleTest):
    """Developer mode -> Reload and Test: Match pair on the sample CT and its deformed twin."""

    def setUp(self):
        # CTest runs test_match_pair_and_heatmap directly (not through runTest): a build
        # machine without torch/MONAI skips instead of failing.
        from GVSLModuleLib import dependencies
        if not dependencies.engine_ready():
            self.skipTest("GVSL's Python packages (torch, MONAI) are not installed")
        slicer.mrmlScene.Clear()

    def runTest(self):
        from GVSLModuleLib import dependencies
        if not dependencies.engine_ready():
            self.delayDisplay("GVSL test skipped: install the Python packages from the GVSL panel first")
            return
        self.setUp()
        self.test_match_pair_and_heatmap()

    def test_match_pair_and_heatmap(self):
        import numpy as np
        self.delayDisplay("Loading the sample CT and its deformed twin")
        logic = GVSLModuleLogic().core
        ct, twin = logic.loadSamplePair()
        fixed, moving = twin, ct  # the deformed twin is the fixed image, as in gvsl demo
        self.delayDisplay("Match pair (CPU, the shipped demo model)")
        result = logic.matchPair(fixed, moving, device="cpu")
        self.assertIsNotNone(result.deformableTransformNode)
        self.assertEqual(result.deformableTransformNode.GetParentTransformNode().GetID(),
                         result.affineTransformNode.GetID())
        self.assertGreaterEqual(result.metrics["local_ncc_after"], 0.0)
        self.assertLess(result.metrics["folding_fraction"], 0.05)
        again = logic.matchPair(fixed, moving, device="cpu")
        self.assertEqual(again.warpedVolumeNode.GetID(), result.warpedVolumeNode.GetID())
        shown = logic.showDeformationGrid(True)
        self.assertTrue(shown and shown[0].GetDisplayNode().GetVisibility() and shown[0].GetDisplayNode().GetVisibility2D())
        centre = [0.0] * 6
        fixed.GetRASBounds(centre)
        point = [(centre[0] + centre[1]) / 2, (centre[2] + centre[3]) / 2, (centre[4] + centre[5]) / 2]
        heatmap, best = logic.similarityHeatmap(point, fixed)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), moving.GetImageData().GetDimensions())
        self.assertEqual(len(best), 3)
        self.assertTrue(np.all(np.isfinite(best)))
        layers = logic.showHeatmapInViews(fixed, heatmap)
        self.assertEqual(slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode().GetBackgroundVolumeID(),
                         fixed.GetID())
        self.assertIn("Red", layers)
        self.delayDisplay("Test passed")
