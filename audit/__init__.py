"""Audits of twins and engines: patch campaigns, VGatt attribution, complexity bounds, reports."""
