"""Run Slicer's own parameterNodeWrapper package (the sources of one Slicer release, in
PACKAGE_DIR) with stand-in Qt widget classes, and ask its ``createGuiConnector`` for every
widget GVSLModule.ui binds through SlicerParameterName, with the parameter types
GVSLModule.py declares and the module's own connector registered as at module import.

Usage: python check_gui_connectors.py PACKAGE_DIR REPO [without-own-connector]
Prints one line per binding and exits 1 if any binding has no connector. Driven by
Testing/test_slicer_connectors_in_slicer_source.py."""
import ast, importlib.util, sys, types, xml.etree.ElementTree as ET
from typing import Annotated

pkg_dir, repo = sys.argv[1], sys.argv[2]
tag = pkg_dir
register_own = len(sys.argv) < 4 or sys.argv[3] != "without-own-connector"

class _Widget:
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()
class _Anything:
    def __call__(self, *a, **k): return _Anything()
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

class FakeModule(types.ModuleType):
    def __init__(self, name):
        super().__init__(name); self._classes = {}
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in self._classes:
            self._classes[name] = type(name, (_Widget,), {})
        return self._classes[name]

sys.modules["qt"] = FakeModule("qt"); sys.modules["ctk"] = FakeModule("ctk")
import slicer  # slicer-core: real vtkMRML classes
fake_slicer_widgets = FakeModule("slicerwidgets")
for name in ("qMRMLSliderWidget", "qMRMLNodeComboBox", "qMRMLSpinBox", "qMRMLRangeWidget", "qMRMLWidget",
             "qSlicerMarkupsPlaceWidget", "qMRMLCheckableNodeComboBox", "qMRMLSubjectHierarchyTreeView"):
    setattr(slicer, name, getattr(fake_slicer_widgets, name))
# the package imports slicer.* names it may not use for connectors
slicer.vtkMRMLScriptedModuleNode = getattr(slicer, "vtkMRMLScriptedModuleNode", type("vtkMRMLScriptedModuleNode", (), {}))

spec = importlib.util.spec_from_file_location("pnw", pkg_dir + "/__init__.py", submodule_search_locations=[pkg_dir])
pnw = importlib.util.module_from_spec(spec); sys.modules["pnw"] = pnw; spec.loader.exec_module(pnw)

source = open(f"{repo}/GVSLModule/GVSLModule.py").read()
tree = ast.parse(source)
namespace = {"ctk": sys.modules["ctk"], "GuiConnector": pnw.GuiConnector, "unannotatedType": pnw.unannotatedType,
             "parameterNodeGuiConnector": pnw.parameterNodeGuiConnector}
for node in tree.body:
    if isinstance(node, ast.ClassDef) and node.name == "GVSLPathLineEditToStrConnector" and register_own:
        exec(compile(ast.Module([node], []), "GVSLModule.py", "exec"), namespace)
types_ns = {"Annotated": Annotated, "Choice": pnw.Choice, "WithinRange": pnw.WithinRange,
            "vtkMRMLScalarVolumeNode": slicer.vtkMRMLScalarVolumeNode}
params = {}
for node in tree.body:
    if isinstance(node, ast.ClassDef) and node.name == "GVSLModuleParameterNode":
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign):
                params[stmt.target.id] = eval(compile(ast.Expression(stmt.annotation), "ann", "eval"), types_ns)

root = ET.parse(f"{repo}/Resources/UI/GVSLModule.ui").getroot()
failures = 0
for w in root.iter("widget"):
    param = next((p.find("string").text for p in w.findall("property") if p.get("name") == "SlicerParameterName"), None)
    if not param:
        continue
    cls = w.get("class")
    module = sys.modules["ctk"] if cls.startswith("ctk") else slicer if cls.startswith("qMRML") else sys.modules["qt"]
    widget = getattr(module, cls)()
    try:
        connector = pnw.createGuiConnector(widget, params[param])
        print(f"  ok   {w.get('name'):34s} {cls:18s} {param:24s} -> {type(connector).__name__}")
    except Exception as exc:
        failures += 1
        print(f"  FAIL {w.get('name'):34s} {cls:18s} {param:24s} -> {type(exc).__name__}: {str(exc)[:90]}")
print(f"{tag}: {failures} bindings without a connector")
sys.exit(1 if failures else 0)
