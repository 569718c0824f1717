// MathJax 3, served from this site (assets/mathjax/tex-svg.js): pymdownx.arithmatex writes \( \) and \[ \]
// on the Markdown pages; the notebooks' Markdown cells use $ and $$, as Jupyter does.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  svg: { fontCache: "global" },
};
