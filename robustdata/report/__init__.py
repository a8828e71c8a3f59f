"""Reports, rendered from Jinja2 templates (templates/) to markdown and autoescaped HTML.

render       documents as data (tables, lists, figures) -> markdown / HTML in one shared page layout
formats      how every report prints a number: percent, mean +- std over seeds (n = 1 shows "(n=1)")
figures      headless matplotlib: the PNG writer, the audit's score histograms and image grids
documents    the audit report and the evaluation summary; evaluation rows for table artifacts
robustify    the Ilyas et al. report: table, headline, image grids, saliency maps, DVC plots data
results_page reports/index.html and index.md, gathered from the stages' JSON metrics
"""
