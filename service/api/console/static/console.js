// The console's own script (the CSP allows no inline one). htmx swaps in no error answer, so a
// polled panel whose refresh fails (a 503 during an outage, or no answer at all) would go on
// showing old figures as if they were current: mark it stale until a refresh replaces it.
"use strict";

function markStale(event) {
  const panel = event.detail.elt;
  const status = event.detail.xhr ? event.detail.xhr.status : 0;
  const why = status ? `the console answered ${status}` : "the console did not answer";
  let note = panel.querySelector(":scope > .stale-note");
  if (note === null) {
    note = document.createElement("p");
    note.className = "stale-note";
    note.setAttribute("role", "status");
    panel.prepend(note);
  }
  panel.classList.add("stale");
  panel.dataset.stale = String(status);
  note.textContent = `Not up to date: the last refresh failed at ${new Date().toLocaleTimeString()} (${why}); retrying.`;
}

document.addEventListener("htmx:responseError", markStale);
document.addEventListener("htmx:sendError", markStale);
