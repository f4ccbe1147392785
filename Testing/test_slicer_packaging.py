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
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py")}
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


# Qt classes a parameterNodeWrapper type binds to.
COMPATIBLE = {
    "str": {"QLineEdit", "ctkPathLineEdit", "QComboBox"},
    "int": {"QSpinBox", "ctkSliderWidget", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"},
    "bool": {"QCheckBox", "QPushButton", "QRadioButton"},
    "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
}


def parameters():
    tree = ast.parse(MODULE_SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GVSLModuleParameterNode")
    out = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign):
            ann = stmt.annotation
            if isinstance(ann, ast.Subscript):  # Annotated[T, ...]
                ann = ann.slice.elts[0]
            out[stmt.target.id] = ann.id
    return out


def ui_widgets():
    root = ET.parse(REPO / "Resources" / "UI" / "GVSLModule.ui").getroot()
    widgets = {}
    for w in root.iter("widget"):
        param = None
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                param = p.find("string").text
        widgets[w.get("name")] = (w.get("class"), param)
    return widgets


def test_ui_parameters_and_widget_names_agree():
    params = parameters()
    widgets = ui_widgets()
    bound = {param: (cls, name) for name, (cls, param) in widgets.items() if param}
    assert set(bound) <= set(params), set(bound) - set(params)
    for param, (cls, name) in bound.items():
        assert cls in COMPATIBLE[params[param]], (param, params[param], cls, name)
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SOURCE))
    assert used <= set(widgets), used - set(widgets)
    # every parameter reaches the GUI or is set by code
    unbound = set(params) - set(bound)
    assert unbound == set(), unbound


def test_catalog_entry_and_extension_metadata():
    entry_path = REPO / "Resources" / "ExtensionsIndex" / "GVSL.json"
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] and entry["scm_url"].endswith(".git")
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
    assert (REPO / "LICENSE").is_file()
