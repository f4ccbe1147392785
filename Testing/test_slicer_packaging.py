"""Static checks of the Slicer extension: CMake lists every run-time file, the .ui and
the parameter wrapper agree, the catalog entry is well formed."""
import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "GVSLModule"
ENGINE = REPO / "GVSLExtension" / "gvsl"
CMAKE = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
MODULE_SOURCE = (MODULE / "GVSLModule.py").read_text(encoding="utf-8")


def cmake_list(name):
    match = re.search(r"set\(" + name + r"\s+(.*?)\)", CMAKE, re.S)
    assert match, name
    return [item for item in match.group(1).split() if not item.startswith("#")]


def test_every_module_and_engine_file_is_listed_in_cmake():
    scripts = {s for s in cmake_list("MODULE_PYTHON_SCRIPTS") if not s.startswith("$")} | {"GVSLModule.py"}
    # GVSLWeb is the browser front end (its own server, trame): not part of the Slicer module.
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if p.relative_to(MODULE).parts[0] != "GVSLWeb"}
    assert on_disk == scripts, on_disk ^ scripts
    engine = set(cmake_list("GVSL_ENGINE_SCRIPTS"))
    engine_on_disk = {str(p.relative_to(ENGINE)) for p in ENGINE.rglob("*.py")}
    assert engine_on_disk == engine, engine_on_disk ^ engine
    assets = set(cmake_list("GVSL_ENGINE_RESOURCES"))
    assets_on_disk = {str(p.relative_to(ENGINE)) for p in (ENGINE / "assets").iterdir() if p.is_file()}
    assert assets_on_disk == assets, assets_on_disk ^ assets


def test_every_resource_the_module_loads_is_listed_and_exists():
    listed = set(cmake_list("MODULE_RESOURCES"))
    used = set(re.findall(r'resource_path\("([^"]+)"\)', MODULE_SOURCE))
    assert used and used <= listed, used - listed
    for resource in listed:
        assert (REPO / "Resources" / resource).is_file(), resource


def test_module_imports_only_listed_packages():
    allowed_local = {"GVSLModuleLib", "gvsl"}
    for path in [MODULE / "GVSLModule.py", *(MODULE / "GVSLModuleLib").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                top = node.module.split(".")[0]
                if top in allowed_local:
                    target = (MODULE if top == "GVSLModuleLib" else ENGINE.parent) / (node.module.replace(".", "/"))
                    assert target.with_suffix(".py").exists() or (target / "__init__.py").exists(), node.module


def test_library_is_qt_free_and_engine_is_slicer_free():
    for path in (MODULE / "GVSLModuleLib").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(qt|ctk)\b", text, re.M), path
        assert "slicer.app" not in text, path
    for path in ENGINE.rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk)\b", path.read_text(encoding="utf-8"), re.M), path


# Which widget class Slicer's parameterNodeWrapper connects to which parameter type, per
# Slicer release: the ``canRepresent`` of every connector in
# Base/Python/slicer/parameterNodeWrapper/guiConnectors.py at tags v5.6.0, v5.8.0, v5.10.0.
# "bounded": the connector raises unless the parameter has a WithinRange; "choice": it
# raises unless the parameter has a Choice.
_V56 = {
    "QCheckBox": {"bool"}, "QPushButton": {"bool"},
    "QSlider": {"int"}, "QSpinBox": {"int"},
    "QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"}, "qMRMLSliderWidget": {"float"},
    "QComboBox": {"int", "float", "str", "bool", "enum"},
    "QLineEdit": {"str"}, "QTextEdit": {"str"},
    "ctkRangeWidget": {"FloatRange"},
    "ctkPathLineEdit": {"Path"}, "ctkDirectoryButton": {"Path"},
    "qMRMLNodeComboBox": {"node"},
}
_V58 = {**_V56, "ctkCheckBox": {"bool"}, "ctkDoubleSlider": {"float"}, "ctkDoubleSpinBox": {"float"},
        "qMRMLSpinBox": {"float"}, "ctkComboBox": _V56["QComboBox"], "QLabel": {"str"},
        "ctkDoubleRangeSlider": {"FloatRange"}, "qMRMLRangeWidget": {"FloatRange"}}
_V510 = {**_V58, "ctkCheckablePushButton": {"bool"}, "ctkColorPickerButton": {"QColor"},
         **{w: {"float", "int"} for w in ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget",
                                          "ctkDoubleSlider", "ctkDoubleSpinBox", "qMRMLSpinBox")}}
SLICER_CONNECTORS = {"5.6": _V56, "5.8": _V58, "5.10": _V510}
NEEDS_BOUNDS = {"QSlider", "ctkSliderWidget", "qMRMLSliderWidget"}
NEEDS_CHOICE_FOR = {"QComboBox", "ctkComboBox"}
NODE_TYPES = {"vtkMRMLScalarVolumeNode"}
# GVSLModule.py registers one connector of its own (GVSLPathLineEditToStrConnector).
GVSL_CONNECTORS = {"ctkPathLineEdit": {"str"}}


def parameters():
    """{name: (type name, annotation names)} of GVSLModuleParameterNode."""
    tree = ast.parse(MODULE_SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GVSLModuleParameterNode")
    out = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign):
            ann, extras = stmt.annotation, []
            if isinstance(ann, ast.Subscript):  # Annotated[T, ...]
                ann, *rest = ann.slice.elts
                extras = [e.func.id for e in rest if isinstance(e, ast.Call)]
            kind = "node" if ann.id in NODE_TYPES else ann.id
            out[stmt.target.id] = (kind, extras)
    return out


def ui_widgets():
    root = ET.parse(REPO / "Resources" / "UI" / "GVSLModule.ui").getroot()
    widgets = {}
    for w in root.iter("widget"):
        param = None
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                param = p.find("string").text
        items = [i.find("property/string").text for i in w.findall("item")]
        widgets[w.get("name")] = (w.get("class"), param, items)
    return widgets


def test_every_bound_widget_has_a_connector_in_slicer_5_6_to_5_10():
    params = parameters()
    bound = {param: (cls, name, items) for name, (cls, param, items) in ui_widgets().items() if param}
    assert set(bound) == set(params), set(bound) ^ set(params)  # every parameter reaches the GUI
    for version, table in SLICER_CONNECTORS.items():
        for param, (cls, name, items) in bound.items():
            kind, extras = params[param]
            accepted = table.get(cls, set()) | GVSL_CONNECTORS.get(cls, set())
            assert kind in accepted, f"Slicer {version}: no connector for {name} ({cls}) <-> {param}: {kind}"
            if cls in NEEDS_BOUNDS:
                assert "WithinRange" in extras, (version, param)
            if cls in NEEDS_CHOICE_FOR:
                assert "Choice" in extras, (version, param)


def test_combo_box_items_are_the_parameter_choices():
    tree = ast.parse(MODULE_SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GVSLModuleParameterNode")
    choices = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.annotation, ast.Subscript):
            for extra in stmt.annotation.slice.elts[1:]:
                if isinstance(extra, ast.Call) and extra.func.id == "Choice":
                    choices[stmt.target.id] = ast.literal_eval(extra.args[0])
    for name, (cls_name, param, items) in ui_widgets().items():
        if param in choices:
            assert items == choices[param], (name, items, choices[param])
    # The panel cannot import the engine's constants (torch) when Slicer loads it: the
    # choices it offers must still be the engine's.
    from gvsl.refine import DETAIL_MAX_VOXELS, SIMILARITIES
    assert choices["refineDetail"] == list(DETAIL_MAX_VOXELS)
    web_page = (REPO / "GVSLModule" / "GVSLWeb" / "app.py").read_text(encoding="utf-8")
    assert f'v_model=("match_detail",), items=("{list(DETAIL_MAX_VOXELS)}",)' in web_page
    assert choices["similarity"] == list(SIMILARITIES)


def test_the_modules_own_path_connector_is_registered_for_str():
    tree = ast.parse(MODULE_SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GVSLPathLineEditToStrConnector")
    assert any(getattr(d, "id", None) == "parameterNodeGuiConnector" for d in cls.decorator_list)
    assert [b.id for b in cls.bases] == ["GuiConnector"]
    methods = {f.name: ast.unparse(f) for f in cls.body if isinstance(f, ast.FunctionDef)}
    # GuiConnector's abstract methods, the same from 5.6 to 5.10
    assert {"canRepresent", "create", "_connect", "_disconnect", "widget", "read", "write"} <= set(methods)
    assert "ctk.ctkPathLineEdit" in methods["canRepresent"] and "== str" in methods["canRepresent"]
    assert "currentPathChanged" in methods["_connect"]
    # the connector must exist before any widget connects, i.e. at import of the module
    assert MODULE_SOURCE.index("class GVSLPathLineEditToStrConnector") < MODULE_SOURCE.index(
        "class GVSLModuleParameterNode")


def test_widget_names_used_in_code_exist():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SOURCE))
    assert used <= set(ui_widgets()), used - set(ui_widgets())


def test_category_is_translated_with_slicers_context_and_icon_is_found_in_a_checkout():
    assert 'translate("qSlicerAbstractCoreModule", "Registration")' in MODULE_SOURCE
    # ScriptedLoadableModule looks for <module dir>/Resources/Icons/<module name>.png
    icon = MODULE / "Resources" / "Icons" / "GVSLModule.png"
    assert icon.read_bytes() == (REPO / "Resources" / "Icons" / "GVSLModule.png").read_bytes()


def test_module_imports_no_engine_at_load():
    """GVSLModule.py's top level imports only Slicer, Qt and the standard library: the
    engine (torch, MONAI) may not be installed when Slicer loads the module."""
    tree = ast.parse(MODULE_SOURCE)
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module.split(".")[0])
    assert top <= {"logging", "os", "sys", "tempfile", "typing", "ctk", "qt", "slicer", "vtk"}, top


def test_catalog_entry_and_extension_metadata():
    entry_path = REPO / "Resources" / "ExtensionsIndex" / "GVSL.json"
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] and entry["scm_url"].endswith(".git")
    # The Extensions Index CI requires a repository named Slicer* (and the GitHub topic
    # 3d-slicer-extension, set on GitHub): every URL names SlicerGVSL.
    assert entry["scm_url"] == "https://github.com/gvsl-slicer/SlicerGVSL.git"
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.search(r"project\((\w+)\)", top).group(1)
    assert entry_path.stem == project and not project.startswith("Slicer")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(r"set\(" + key + r" \"[^\"]+\"\)", top), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "add_subdirectory(GVSLModule)" in top and "find_package(Slicer REQUIRED)" in top
    for url in re.search(r'EXTENSION_SCREENSHOTURLS "([^"]+)"', top).group(1).split():
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in re.search(key + r' "([^"]+)"', top).group(1).split():
            assert "/gvsl-slicer/SlicerGVSL" in url, (key, url)
    icon_url = re.search(r'EXTENSION_ICONURL "([^"]+)"', top).group(1)
    assert (REPO / icon_url.split("/main/", 1)[1]).is_file(), icon_url
    assert (REPO / "LICENSE").is_file()
