"""GVSL in the browser: the Slicer panel's workflow over GVSLModuleLib, served with trame."""
