"""Tiled, fused CNN training (arXiv 2409.09083): the method, its engine and its tile actors.

A method that brings its own engine lives in one package a layer above the methods (its engine
starts Ray actors and writes device reports); the method registry names it by path
(``flexray.tiled.method:Tiled``) and the method names its engine the same way.
"""
