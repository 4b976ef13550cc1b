// spray-audit report: draws the figures stored in #report-data, lazily inside collapsed sections, and shows
// hover thumbnails on embedding plots. No network: everything it uses is in this file.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var config = { displaylogo: false, responsive: true };
  var tip = document.createElement("div");
  tip.id = "hover-thumb";
  tip.hidden = true;
  document.body.appendChild(tip);

  function showThumb(event) {
    var point = event.points && event.points[0];
    if (!point) return;
    var id = String(point.customdata);
    var pictures = data.thumbs[id];
    tip.replaceChildren();
    var caption = document.createElement("div");
    caption.textContent = id; // text, never markup: ids come from the data set
    tip.appendChild(caption);
    if (pictures) {
      pictures.forEach(function (src, i) {
        var image = document.createElement("img");
        image.src = src;
        image.alt = (i === 0 ? "input " : "heatmap ") + id;
        tip.appendChild(image);
      });
    }
    var mouse = event.event || {};
    tip.style.left = ((mouse.clientX || 0) + 16) + "px";
    tip.style.top = ((mouse.clientY || 0) + 16) + "px";
    tip.hidden = false;
  }

  function renderFigures(root) {
    root.querySelectorAll("[data-figure]:not([data-rendered])").forEach(function (el) {
      var spec = data.figures[el.dataset.figure];
      el.dataset.rendered = "1";
      Plotly.newPlot(el, spec.data, spec.layout, config).then(function (gd) {
        if (el.classList.contains("embedding")) {
          gd.on("plotly_hover", showThumb);
          gd.on("plotly_unhover", function () { tip.hidden = true; });
        }
        el.dataset.rendered = "done";
      });
    });
  }

  function materialize(details) {
    var template = details.querySelector(":scope > template");
    if (!template) return;
    var body = document.createElement("div");
    body.className = "body";
    body.appendChild(template.content.cloneNode(true));
    template.replaceWith(body);
    wire(body);
    renderFigures(body);
  }

  function wire(root) {
    root.querySelectorAll("details.lazy").forEach(function (details) {
      details.addEventListener("toggle", function () { if (details.open) materialize(details); });
      if (details.open) materialize(details);
    });
  }

  function openTarget() {
    var id = decodeURIComponent(location.hash.slice(1));
    var target = id && document.getElementById(id);
    for (var el = target; el; el = el.parentElement) {
      if (el.tagName === "DETAILS" && !el.open) { el.open = true; materialize(el); }
    }
    if (target) target.scrollIntoView();
  }

  renderFigures(document);
  wire(document);
  window.addEventListener("hashchange", openTarget);
  if (location.hash) openTarget();
  window.sprayReport = { materialize: materialize, data: data };
})();
