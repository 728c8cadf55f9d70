// The search page: reads the query from the URL, asks /api/search, draws a card per result with the
// best frame, the regions that matched the query words, and the words in their boxes' colours.
// A card opens every sampled frame of its item (/api/item) with all detected regions, and a link to the
// items most like it (?like=ID: /api/search?like=ID, cards without words). "Like a clip…" (or a file dropped on the
// page) sends a video or photo of the user's to /api/like and shows the items most like it the same way.
// Every address it asks is relative (api/search, ?like=ID): the page works under a proxy's prefix too
// (JupyterHub's https://HUB/user/NAME/proxy/8000/, a path of nginx's).
"use strict";

const COLOURS = 8; // .c0 ... .c7 in page.css
const DEFAULT_K = "12";
const MAX_K = 100; // app.py's MAX_K
const STATUS_QUERY = 60; // characters of the query the status line repeats: a long one filled a phone's screen
const NO_ANSWER = "the server does not answer: is `vlpcache serve` still running?";
const params = new URLSearchParams(location.search);
const hitsById = new Map();
let colours = new Map(); // query word -> colour class
let info = null; // /api/info, once: how many items, and which run and epoch answer
let itemShown = 0; // counts the items opened and dialogs closed: an /api/item answer that comes late is dropped

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children); // strings become text nodes: nothing from the data is parsed as HTML
  return node;
}

function frameUrl(id, frame) {
  return "media/frame?" + new URLSearchParams({ id, t: frame });
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// a box over a frame, in percent of the picture (boxes are normalised x1, y1, x2, y2); its tag sits
// above it, inside it at the top edge, and ends at its right side when the box is near the right edge
function box([x1, y1, x2, y2], className, ...tag) {
  const node = el("div", { class: "box " + className });
  Object.assign(node.style, {
    left: `${100 * x1}%`, top: `${100 * y1}%`, width: `${100 * (x2 - x1)}%`, height: `${100 * (y2 - y1)}%`,
  });
  const place = (y1 < 0.08 ? " inside" : "") + (x1 > 0.55 ? " right" : "");
  if (tag.length) node.append(el("span", { class: "tag" + place }, ...tag));
  return node;
}

// tags end at their box's right side where they would run past the picture's (and slide in where
// they then run past its left), and step down below the tags already placed that they would cover.
// The matched words' tags come first; a detected region's tag (the item view's, in the detector's order
// of confidence) that would still cover another is hidden, its dashed box left: unreadable tags piled
// on each other say less than none
function placeTags(container) {
  for (const picture of container.querySelectorAll(".picture")) {
    const edge = picture.getBoundingClientRect();
    const placed = [];
    const tags = [...picture.querySelectorAll(".box:not(.detected) > .tag"), ...picture.querySelectorAll(".box.detected > .tag")];
    for (const tag of tags) {
      const detected = tag.parentElement.classList.contains("detected");
      tag.style.transform = "";
      tag.style.visibility = "";
      if (tag.getBoundingClientRect().right > edge.right) tag.classList.add("right");
      const dx = Math.max(0, edge.left - tag.getBoundingClientRect().left);
      let free = false;
      for (let step = 0; step <= (detected ? 1 : 4) && !free; step++) {
        tag.style.transform = `translate(${dx}px, ${step * 100}%)`;
        free = !placed.some((other) => overlap(other, tag.getBoundingClientRect()));
      }
      if (detected && !free) {
        tag.style.visibility = "hidden";
        continue;
      }
      placed.push(tag.getBoundingClientRect());
    }
    const frame = (picture.closest(".frame") || picture).getBoundingClientRect();
    for (const whole of picture.querySelectorAll(".whole")) { // the whole frame's words: inside the card's frame
      whole.style.transform = "";
      const at = whole.getBoundingClientRect();
      whole.style.transform = `translateX(${Math.max(frame.left + 6 - at.left, Math.min(0, frame.right - 6 - at.right))}px)`;
    }
  }
}

function overlap(a, b) {
  return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
}

// a picture keeps its aspect inside its frame (page.css sizes it by --aspect): a card's 4:3 frame, so that the cards
// of a row line up; the item view's, at most so tall that it fits the dialog (a photo of 40 x 4000 pixels)
function fitInFrame(picture, img) {
  img.addEventListener("load", () => {
    picture.style.setProperty("--aspect", img.naturalWidth / img.naturalHeight);
    placeTags(picture.parentElement);
  });
}

// a query's words as the text model's tokenizer reads them (BERT's basic tokenizer): each punctuation mark
// and each CJK character a word of its own ("dog's" is dog ' s; "src=x" is src = x), compared in lower
// case without accents ("Café" is the API's "cafe")
const PIECES = /([\p{P}!-\/:-@\[-`{-~]|\p{Script=Han})/u;

function pieces(text) {
  return text.split(PIECES).filter((piece) => piece !== "");
}

function normalised(word) {
  return word.toLowerCase().normalize("NFD").replace(/\p{M}/gu, "");
}

// one colour per matched word, in the order the words come in the query
function assignColours(query, hits) {
  const order = query.split(/\s+/).flatMap(pieces).map(normalised);
  const words = [...new Set(hits.flatMap((h) => h.regions.map((r) => r.word)))];
  words.sort((a, b) => (order.indexOf(a) + 1 || 1e9) - (order.indexOf(b) + 1 || 1e9));
  return new Map(words.map((word, i) => [word, "c" + (i % COLOURS)]));
}

// the query's words, each matched one in its colour, the parts the text model does not know underlined; the end
// it did not read (past its tokens) struck out. `unread` and `unknown` are the server's, as typed: the query's
// last characters, and parts of the rest ("&#x732B;" where the model read "猫")
function showQueryWords(query, unread, unknown = []) {
  const line = $("query-words");
  line.replaceChildren();
  const read = query.slice(0, query.length - unread.length);
  const longestFirst = [...unknown].sort((a, b) => b.length - a.length); // a part inside another is not cut from it
  const strange = new RegExp(`(${longestFirst.map(literal).join("|")})`);
  for (const [i, part] of (unknown.length ? read.split(strange) : [read]).entries()) {
    if (i % 2 === 1) line.append(el("span", { class: "unknown", title: "not known to the text model" }, part));
    else line.append(...colouredWords(part));
  }
  if (unread) line.append(el("s", { class: "unread", title: "not read: past the tokens the model reads" }, unread));
}

// a regular expression's source that matches `text` as written
function literal(text) {
  return text.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
}

// text and its words as nodes, each matched word a mark in its colour
function colouredWords(text) {
  return text.split(/(\s+)/).flatMap((part, i) => i % 2 === 1 ? [part] : pieces(part).map((piece) => {
    const colour = colours.get(normalised(piece));
    return colour ? el("mark", { class: colour }, piece) : piece;
  }));
}

const WHOLE_FRAME = "frame"; // the label of the region that stands for the whole frame

function labelText(label) {
  return label === WHOLE_FRAME ? "whole frame" : label;
}

// where a frame sits, for a person: seconds of a video, the place of a frames folder's image in name
// order (1 for the first; the API's time counts from 0), nothing for a photo (its one frame)
function placeText(kind, time) {
  if (time === null || time === undefined || kind === "image") return "";
  return kind === "frames" ? `image ${Math.round(time) + 1}` : clockText(time);
}

// a time in a video as report.clock_text says it: "12.40 s", "41:15.64", "1:02:03.50", rounded down as
// report.hundredths_down rounds it, so that `ffmpeg -ss` of it lands on that frame and not the next
function clockText(seconds) {
  let hundredths = Math.floor(seconds * 100 * (1 + 2e-7) + 1e-3);
  if (hundredths < 6000) return `${(hundredths / 100).toFixed(2)} s`;
  let minutes = Math.floor(hundredths / 6000);
  hundredths -= minutes * 6000;
  const hours = Math.floor(minutes / 60);
  minutes -= hours * 60;
  const secs = (hundredths / 100).toFixed(2).padStart(5, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${secs}` : `${minutes}:${secs}`;
}

// a region per query word, the first of a word said again ("big big dog")
function firstOfEachWord(regions) {
  const seen = new Set();
  return regions.filter((r) => !seen.has(r.word) && seen.add(r.word));
}

function wordChip(region, hit) {
  const place = placeText(hit.kind, region.time);
  const where = region.frame === hit.frame || !place ? "" : ` @ ${place}`;
  return el("span", { class: "chip " + (colours.get(region.word) || ""), title: `attention ${region.weight}` },
    el("mark", {}, region.word), ` ${labelText(region.label)}${where}`);
}

// the words matched on this frame: a box per region (naming every word that chose it), and for the
// whole-frame region a line along the bottom
function drawMatches(picture, regions, frame) {
  const here = regions.filter((r) => r.frame === frame);
  const byRegion = new Map();
  for (const region of here.filter((r) => r.label !== WHOLE_FRAME)) {
    const key = region.box.join();
    byRegion.set(key, [...(byRegion.get(key) || []), region]);
  }
  for (const words of byRegion.values()) {
    const marks = firstOfEachWord(words).map((r) => el("mark", { class: colours.get(r.word) || "" }, r.word));
    picture.append(box(words[0].box, colours.get(words[0].word), ...marks, ` → ${words[0].label}`));
  }
  const whole = here.filter((r) => r.label === WHOLE_FRAME);
  if (whole.length) {
    picture.append(el("div", { class: "whole" },
      ...firstOfEachWord(whole).map((r) => el("mark", { class: colours.get(r.word) || "" }, r.word)), " → whole frame"));
  }
}

// the note of an item kept anyway (a truncated video, unreadable frames, photos in a frames folder), as extract said;
// why its cached row cannot be read; what is off with a hit (its source gone, extracted again since indexed)
function noted(item) {
  return (item.note ? ` · kept with a note: ${item.note}` : "") + (item.unreadable ? ` · ${item.unreadable}` : "") +
    (item.outdated ? ` · ${item.outdated}` : "");
}

function card(hit) {
  const place = placeText(hit.kind, hit.time);
  const img = el("img", { src: frameUrl(hit.id, hit.frame ?? 0), alt: hit.id + (place ? ` at ${place}` : "") });
  const picture = el("div", { class: "picture" }, img);
  drawMatches(picture, hit.regions, hit.frame);
  fitInFrame(picture, img);
  const score = hit.local_score === null
    ? `global ${hit.global_score.toFixed(3)}`
    : `global ${hit.global_score.toFixed(3)} + region-word ${hit.local_score.toFixed(3)}`;
  // the items most like this one, a link of its own (the card itself opens the item's frames)
  const like = el("a", { class: "like", href: "?" + new URLSearchParams({ like: hit.id, k: $("k").value }),
    title: `The items most like ${hit.id}` }, "like this");
  like.addEventListener("click", (event) => event.stopPropagation());
  const node = el("article", { class: "card", tabindex: "0", "data-id": hit.id },
    el("div", { class: "frame fixed" }, picture),
    el("p", { class: "meta" },
      el("span", { class: "rank" }, `#${hit.rank}`),
      el("span", { class: "score", title: score }, hit.score.toFixed(3)),
      el("span", { class: "time" }, place ? `@ ${place}` : ""), like),
    el("p", { class: "id", title: hit.path }, hit.id),
    ...(hit.note ? [el("p", { class: "note", title: hit.note }, `kept with a note: ${hit.note}`)] : []),
    ...(hit.outdated ? [el("p", { class: "note", title: hit.outdated }, hit.outdated)] : []),
    el("p", { class: "words" }, ...firstOfEachWord(hit.regions).map((r) => wordChip(r, hit))));
  node.addEventListener("click", () => openItem(hit.id, true));
  node.addEventListener("keydown", (event) => {
    if ((event.key !== "Enter" && event.key !== " ") || event.target !== node) return; // Enter on its link follows it
    event.preventDefault(); // else the same key press clicks the close button the open dialog focuses (or scrolls)
    openItem(hit.id, true);
  });
  return node;
}

async function getJson(url) {
  let response;
  try {
    response = await fetch(url);
  } catch {
    throw new Error(NO_ANSWER); // the browser's own words ("Failed to fetch") say nothing about what to do
  }
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// the address's q as it was written when its bytes are not UTF-8 ("caf%E9", a Latin-1 page's link): URLSearchParams
// reads each such byte as U+FFFD, a character nobody typed; sent as written, the server names the byte; else null
function undecodedQuery() {
  const written = location.search.slice(1).split("&").find((part) => part.startsWith("q="));
  if (written === undefined) return null;
  try {
    decodeURIComponent(written.slice(2).replace(/\+/g, " "));
    return null;
  } catch {
    return written.slice(2);
  }
}

async function search(query, k, written = null) {
  setStatus("Searching…");
  const started = performance.now();
  let body;
  try {
    const asked = written === null ? new URLSearchParams({ q: query, k }) : `q=${written}&k=${encodeURIComponent(k)}`;
    body = await getJson("api/search?" + asked);
  } catch (err) {
    setStatus(`error: ${err.message}`, true);
    return;
  }
  const hits = body.results;
  colours = assignColours(query, hits);
  hitsById.clear();
  hits.forEach((hit) => hitsById.set(hit.id, hit));
  showQueryWords(body.query, body.unread, body.unknown); // the query as the server read it: unread is its end
  $("results").replaceChildren(...hits.map(card));
  const ms = Math.round(performance.now() - started);
  const cut = (body.unread ? " · the end of the query, struck out below, is past what the model reads and was left out" : "") +
    unknownText(body.unknown || [], body.reads_nothing) +
    (body.weak ? " · weak matches: the best is below what 99 in 100 of the run's training captions find here" : "");
  const model = (await info)?.model; // which run answered stays in sight beside its results
  const named = query.length > STATUS_QUERY ? query.slice(0, STATUS_QUERY - 1) + "…" : query; // all of it is in the box
  setStatus((hits.length ? `${hits.length} results for “${named}” · ${ms} ms` : `nothing found for “${named}”`) +
    (model ? ` · ${model}` : "") + cut);
}

// the items most like an indexed one (?like=ID): cards as a query's, by global similarity, no words to colour
async function searchLike(id, k) {
  setStatus("Searching…");
  const started = performance.now();
  let body;
  try {
    body = await getJson("api/search?" + new URLSearchParams({ like: id, k }));
  } catch (err) {
    setStatus(`error: ${err.message}`, true);
    return;
  }
  id = body.like; // the id a file name or path in the address names
  const example = el("a", { href: "?" + new URLSearchParams({ like: id, k, item: id }), class: "example" }, id);
  example.addEventListener("click", (event) => { // its own frames, as a card opens them
    event.preventDefault();
    openItem(id, true);
  });
  await showLike(body.results, id, example, started, "", body.note); // e.g. extracted again since it was indexed
}

// cards of the items most like an example (an indexed item, or a clip of the user's), by global similarity
async function showLike(hits, name, example, started, how, note = "") {
  colours = new Map();
  hitsById.clear();
  hits.forEach((hit) => hitsById.set(hit.id, hit));
  $("query-words").replaceChildren("like ", example);
  $("results").replaceChildren(...hits.map(card));
  const ms = Math.round(performance.now() - started);
  const model = (await info)?.model;
  setStatus((hits.length ? `${hits.length} items most like “${name}” · ${ms} ms` : `nothing else to compare “${name}” with`) +
    how + (model ? ` · ${model}` : "") + " · by their whole embeddings: no words, no matched regions" +
    (note ? ` · note: ${note}` : ""));
}

// a video or photo of the user's (the file input, or a file dropped on the page): sent to the server, which
// extracts it on its own as `vlpcache search --like FILE` does, and answers the items most like it
let shownUpload = null; // the file whose items are shown: sent again for another number of results (the server keeps none)
let maxUpload = 0; // /api/info's max_upload_bytes: a larger file is refused here, before minutes of sending it
async function likeUpload(file) {
  if (!file) return;
  if (maxUpload && file.size > maxUpload) {
    setStatus(`error: “${file.name}” is ${megabytes(file.size)}; this server takes files of at most ${megabytes(maxUpload)}`, true);
    $("upload").value = "";
    return;
  }
  const k = $("k").value;
  const started = performance.now();
  let body;
  try {
    const answer = await sendFile("api/like?" + new URLSearchParams({ k }), file, (sent) => setStatus(sent < 1
      ? `Sending “${file.name}” · ${Math.floor(100 * sent)}% of ${megabytes(file.size)}…`
      : `Comparing “${file.name}” with the collection (its frames sampled, its regions detected)…`));
    try {
      body = JSON.parse(answer.text);
    } catch {
      body = {}; // not JSON: a proxy's page, say
    }
    if (!answer.ok || !Array.isArray(body.results)) throw new Error(body.error || `${answer.status} ${answer.statusText}`);
  } catch (err) {
    setStatus(`error: ${err.message}`, true);
    return;
  } finally {
    $("upload").value = ""; // the same file chosen again is sent again
  }
  $("q").value = "";
  const address = "?" + new URLSearchParams({ k });
  if (shownUpload) history.replaceState({ upload: body.like }, "", address); // another file or k: no step of its own
  else history.pushState({ upload: body.like }, "", address);
  shownUpload = file;
  await showLike(body.results, body.like, el("span", { class: "example" }, body.like), started,
    " · extracted on its own: nothing added to the collection");
}

// POST a file with its name in x-vlpcache-filename (the server takes uploads from its own page only); `progress`
// gets the part sent so far (0 to 1, then 1 while the server compares): fetch() tells nothing of an upload's progress
function sendFile(url, file, progress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", url);
    request.setRequestHeader("x-vlpcache-filename", encodeURIComponent(file.name));
    request.upload.onprogress = (event) => { if (event.lengthComputable) progress(Math.min(event.loaded / event.total, 0.99)); };
    request.upload.onload = () => progress(1);
    request.onload = () => resolve({ ok: request.status >= 200 && request.status < 300, status: request.status,
      statusText: request.statusText, text: request.responseText });
    request.onerror = () => reject(new Error(NO_ANSWER));
    progress(0);
    request.send(file);
  });
}

function megabytes(bytes) {
  return bytes < 2 ** 20 ? `${Math.max(1, Math.round(bytes / 1024))} KB` : `${(bytes / 2 ** 20).toFixed(1)} MB`;
}

// what the text model made of words outside its vocabulary (one unknown token each, or spelled out); whether it
// read anything else is the server's to say (reads_nothing), as search says it
function unknownText(unknown, readsNothing) {
  if (!unknown.length) return "";
  const named = unknown.slice(0, 5).map((part) => `“${part}”`).join(", ");
  return readsNothing
    ? ` · the text model knows none of these words (${named}): this order says nothing about them`
    : ` · ${named}: not known to the text model, the results follow the rest of the query`;
}

// an item's frames in the dialog; `step`: a step of its own in the history (opened from a card), so that
// Back closes it, as a phone's Back closes an overlay; else (a link or a reload with &item=, Forward)
// the address as it is
async function openItem(id, step = false) {
  const asked = ++itemShown;
  const dialog = $("detail");
  const hit = hitsById.get(id);
  $("detail-title").textContent = id;
  $("detail-meta").textContent = hit ? `#${hit.rank} · score ${hit.score.toFixed(3)} · ${hit.path}${noted(hit)}` : "";
  $("detail-frames").replaceChildren();
  $("detail-like").href = "?" + new URLSearchParams({ like: id, k: $("k").value });
  if (!dialog.open) dialog.showModal();
  const url = new URL(location.href);
  url.searchParams.set("item", id);
  if (step) history.pushState({ item: id }, "", url);
  else history.replaceState(history.state, "", url);
  let item;
  try {
    item = await getJson("api/item?" + new URLSearchParams({ id }));
  } catch (err) {
    if (asked !== itemShown) return;
    const said = $("detail-meta").textContent; // what the results already told of it stays
    $("detail-meta").textContent = (said ? said + " · " : "") + `error: ${err.message}`;
    return;
  }
  // another item opened since, or the dialog closed (Escape, Back): its answer would show frames under another id
  if (asked !== itemShown) return;
  if (!hit) $("detail-meta").textContent = `${item.path}${noted(item)}`;
  const frames = item.frames.map((frame, i) => {
    const img = el("img", { src: frameUrl(id, frame.frame), alt: `frame ${frame.frame}` });
    const picture = el("div", { class: "picture" }, img);
    for (const region of frame.regions) picture.append(box(region.box, "detected", `${region.label} ${region.score.toFixed(2)}`));
    if (hit) drawMatches(picture, hit.regions, frame.frame);
    fitInFrame(picture, img);
    const best = hit && hit.frame === frame.frame ? " · best match" : "";
    const place = placeText(item.kind, frame.time);
    const which = item.kind === "image" ? "the photo" : `frame ${i + 1} of ${item.frames.length}`;
    return el("figure", {}, el("div", { class: "frame" }, picture),
      el("figcaption", {}, which + (place ? ` · ${place}` : "") + best));
  });
  $("detail-frames").replaceChildren(...frames);
}

// the dialog closed (×, Escape, Back): the step opening it made is taken back, or the address loses its item
function closeItem() {
  itemShown++; // the answer still awaited for it, dropped
  if (history.state?.item && new URLSearchParams(location.search).get("item") === history.state.item) {
    history.back();
    return;
  }
  const url = new URL(location.href);
  url.searchParams.delete("item");
  history.replaceState(null, "", url);
}

// Back and Forward between a result page and one of its items
function followHistory() {
  if (shownUpload && !history.state?.upload && !history.state?.item) {
    location.reload(); // back from a clip's results to the address's own
    return;
  }
  const id = new URLSearchParams(location.search).get("item");
  const dialog = $("detail");
  if (!id && dialog.open) dialog.close();
  else if (id && !dialog.open) openItem(id);
}

// the form as the address has it: a page the browser brings back from its cache (Back) keeps what was
// typed before leaving it, beside results of the query it was opened with
function showAddress() {
  const address = new URLSearchParams(location.search);
  $("q").value = address.get("q") || "";
  $("k").value = chosenK(address.get("k")).k;
}

// the number of results the address asks for: a whole number from 1 to MAX_K, else the default
function chosenK(text) {
  if (text === null || text === "") return { k: DEFAULT_K, bad: "" };
  if (!/^\d+$/.test(text) || +text < 1 || +text > MAX_K) return { k: DEFAULT_K, bad: text };
  return { k: String(+text), bad: "" };
}

// "24 videos (20 as frames folders) and 12 photos": a frames folder is a video's frames
function kindsText(kinds, total) {
  const frames = kinds?.frames || 0, videos = (kinds?.video || 0) + frames, photos = kinds?.image || 0;
  const count = (n, one, many) => `${n.toLocaleString()} ${n === 1 ? one : many}`;
  const parts = [];
  if (videos) {
    parts.push(count(videos, "video", "videos") +
      (frames === videos ? ` (${frames === 1 ? "a frames folder" : "frames folders"})` : frames ? ` (${frames.toLocaleString()} as frames folders)` : ""));
  }
  if (photos) parts.push(count(photos, "photo", "photos"));
  return parts.length ? parts.join(" and ") : `${total.toLocaleString()} items`;
}

// the "Like a clip…" button, and a file dropped anywhere on the page, where the server takes uploads
function allowUploads(largest) {
  maxUpload = largest || 0;
  $("upload-label").hidden = false;
  $("upload").addEventListener("change", () => likeUpload($("upload").files[0]));
  const dropping = (on) => document.body.classList.toggle("dropping", on);
  document.addEventListener("dragover", (event) => {
    if (![...event.dataTransfer.types].includes("Files")) return;
    event.preventDefault();
    dropping(true);
  });
  document.addEventListener("dragleave", (event) => { if (!event.relatedTarget) dropping(false); });
  document.addEventListener("drop", (event) => {
    if (!event.dataTransfer.files.length) return;
    event.preventDefault();
    dropping(false);
    likeUpload(event.dataTransfer.files[0]);
  });
}

async function start() {
  const query = (params.get("q") || "").trim();
  const like = query ? null : params.get("like");
  const { k, bad } = chosenK(params.get("k"));
  $("q").value = query;
  if (![...$("k").options].some((o) => o.value === k)) $("k").append(el("option", { value: k }, `${k} results`));
  $("k").value = k;
  $("k").addEventListener("change", () => { // more or fewer of the results shown
    if ($("q").value.trim()) $("search").requestSubmit();
    else if (shownUpload) likeUpload(shownUpload);
    else if (like) location.search = "?" + new URLSearchParams({ like, k: $("k").value });
  });
  $("detail-close").addEventListener("click", () => $("detail").close());
  $("detail").addEventListener("close", closeItem);
  window.addEventListener("popstate", followHistory);
  window.addEventListener("pageshow", (event) => { if (event.persisted) showAddress(); });
  const about = getJson("api/info");
  info = about.catch(() => null); // results do not wait on it failing
  about.then((i) => { if (i.example) $("q").placeholder = i.example; }, () => {});
  about.then((i) => { if (i.uploads) allowUploads(i.max_upload_bytes); }, () => {});
  if (query || like) {
    await (query ? search(query, k, undecodedQuery()) : searchLike(like, k));
    if (bad) setStatus(`${$("status").textContent} · “${bad}” results is not a number from 1 to ${MAX_K}: ${k} shown`);
  } else {
    about.then((i) => setStatus(`Search ${kindsText(i.kinds, i.items)} by what happens in them` +
      (i.model ? ` (model: ${i.model}).` : ".") +
      (i.unindexed ? ` ${i.unindexed.toLocaleString()} cached ${i.unindexed === 1 ? "item is" : "items are"} new or ` +
        "extracted again since the index was built: run `vlpcache index`." : "") +
      (i.newer ? ` Note: ${i.newer}.` : "")),
      (err) => setStatus(`error: ${err.message}`, true));
  }
  if (params.get("item")) openItem(params.get("item"));
}

start();
