// /docs: Swagger UI over /openapi.json, every request carrying this tab's API key.
"use strict";
const KEY = "quantyard.apiKey";
function load() {
  const key = sessionStorage.getItem(KEY);
  document.getElementById("note").textContent = key ? "key set for this tab"
    : "paste an API key (quantyard keys create) to load the schema";
  if (!key) return;
  SwaggerUIBundle({
    url: "/openapi.json", dom_id: "#swagger-ui",
    validatorUrl: null,  // the default sends the schema's URL to a third-party validator badge
    // Every request, the schema's own included, carries the key; "Try it out" works at once.
    requestInterceptor: (req) => { req.headers["Authorization"] = "Bearer " + sessionStorage.getItem(KEY); return req; },
  });
}
document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = document.getElementById("key").value.trim();
  if (key) sessionStorage.setItem(KEY, key);
  document.getElementById("key").value = "";
  load();
});
load();
