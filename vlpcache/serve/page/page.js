// The search page: reads the query from the URL, asks /api/search, draws a card per result with the
// best frame, the regions that matched the query words, and the words in their boxes' colours.
// A card opens every sampled frame of its item (/api/item) with all detected regions.
"use strict";

const COLOURS = 8; // .c0 ... .c7 in page.css
const params = new URLSearchParams(location.search);
const hitsById = new Map();
let colours = new Map(); // query word -> colour class
let info = null; // /api/info, once: how many items, and which run and epoch answer

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children); // strings become text nodes: nothing from the data is parsed as HTML
  return node;
}

function frameUrl(id, frame) {
  return "/media/frame?" + new URLSearchParams({ id, t: frame });
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
// they then run past its left), and step down below the tags already placed that they would cover
function placeTags(container) {
  for (const picture of container.querySelectorAll(".picture")) {
    const edge = picture.getBoundingClientRect();
    const placed = [];
    for (const tag of picture.querySelectorAll(".box:not(.detected) > .tag")) {
      tag.style.transform = "";
      if (tag.getBoundingClientRect().right > edge.right) tag.classList.add("right");
      const dx = Math.max(0, edge.left - tag.getBoundingClientRect().left);
      for (let step = 0; step <= 4; step++) {
        tag.style.transform = `translate(${dx}px, ${step * 100}%)`;
        if (!placed.some((other) => overlap(other, tag.getBoundingClientRect()))) break;
      }
      placed.push(tag.getBoundingClientRect());
    }
  }
}

function overlap(a, b) {
  return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
}

// a card's picture keeps its aspect inside a 4:3 frame, so that the cards of a row line up
function fitInFrame(picture, img) {
  img.addEventListener("load", () => {
    const aspect = img.naturalWidth / img.naturalHeight;
    picture.style.width = aspect < 4 / 3 ? `${75 * aspect}%` : "100%";
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

// the query's words, each matched one in its colour; an end the model did not read (past its tokens) struck out
function showQueryWords(query, unread) {
  const line = $("query-words");
  line.replaceChildren();
  const cut = unread ? query.lastIndexOf(unread) : -1;
  const read = cut >= 0 ? query.slice(0, cut) : query;
  for (const [i, part] of read.split(/(\s+)/).entries()) {
    for (const piece of i % 2 === 0 ? pieces(part) : [part]) {
      const colour = i % 2 === 0 ? colours.get(normalised(piece)) : undefined;
      line.append(colour ? el("mark", { class: colour }, piece) : piece);
    }
  }
  if (unread) line.append(el("s", { class: "unread", title: "not read: past the tokens the model reads" }, unread));
}

const WHOLE_FRAME = "frame"; // the label of the region that stands for the whole frame

function labelText(label) {
  return label === WHOLE_FRAME ? "whole frame" : label;
}

function wordChip(region, hit) {
  const where = region.frame === hit.frame ? "" : ` @ ${region.time.toFixed(2)} s`;
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
    const marks = words.map((r) => el("mark", { class: colours.get(r.word) || "" }, r.word));
    picture.append(box(words[0].box, colours.get(words[0].word), ...marks, ` → ${words[0].label}`));
  }
  const whole = here.filter((r) => r.label === WHOLE_FRAME);
  if (whole.length) {
    picture.append(el("div", { class: "whole" },
      ...whole.map((r) => el("mark", { class: colours.get(r.word) || "" }, r.word)), " → whole frame"));
  }
}

// the note of an item kept anyway (a truncated video, unreadable frames, photos in a frames folder), as extract said;
// or why its cached row cannot be read
function noted(item) {
  return (item.note ? ` · kept with a note: ${item.note}` : "") + (item.unreadable ? ` · ${item.unreadable}` : "");
}

function card(hit) {
  const img = el("img", { src: frameUrl(hit.id, hit.frame ?? 0), alt: `${hit.id} at ${hit.time} s` });
  const picture = el("div", { class: "picture" }, img);
  drawMatches(picture, hit.regions, hit.frame);
  fitInFrame(picture, img);
  const score = hit.local_score === null
    ? `global ${hit.global_score.toFixed(3)}`
    : `global ${hit.global_score.toFixed(3)} + region-word ${hit.local_score.toFixed(3)}`;
  const node = el("article", { class: "card", tabindex: "0", "data-id": hit.id },
    el("div", { class: "frame fixed" }, picture),
    el("p", { class: "meta" },
      el("span", { class: "rank" }, `#${hit.rank}`),
      el("span", { class: "score", title: score }, hit.score.toFixed(3)),
      el("span", { class: "time" }, hit.time === null ? "" : `@ ${hit.time.toFixed(2)} s`)),
    el("p", { class: "id", title: hit.path }, hit.id),
    ...(hit.note ? [el("p", { class: "note", title: hit.note }, `kept with a note: ${hit.note}`)] : []),
    ...(hit.outdated ? [el("p", { class: "note", title: hit.outdated }, hit.outdated)] : []),
    el("p", { class: "words" }, ...hit.regions.map((r) => wordChip(r, hit))));
  node.addEventListener("click", () => openItem(hit.id));
  node.addEventListener("keydown", (event) => { if (event.key === "Enter") openItem(hit.id); });
  return node;
}

async function getJson(url) {
  const response = await fetch(url);
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function search(query, k) {
  setStatus("Searching…");
  const started = performance.now();
  let body;
  try {
    body = await getJson("/api/search?" + new URLSearchParams({ q: query, k }));
  } catch (err) {
    setStatus(`error: ${err.message}`, true);
    return;
  }
  const hits = body.results;
  colours = assignColours(query, hits);
  hitsById.clear();
  hits.forEach((hit) => hitsById.set(hit.id, hit));
  showQueryWords(query, body.unread);
  $("results").replaceChildren(...hits.map(card));
  const ms = Math.round(performance.now() - started);
  const cut = body.unread ? " · the end of the query, struck out below, is past what the model reads and was left out" : "";
  const model = (await info)?.model; // which run answered stays in sight beside its results
  setStatus((hits.length ? `${hits.length} results for “${query}” · ${ms} ms` : `nothing found for “${query}”`) +
    (model ? ` · ${model}` : "") + cut);
}

async function openItem(id) {
  const dialog = $("detail");
  const hit = hitsById.get(id);
  $("detail-title").textContent = id;
  $("detail-meta").textContent = hit ? `#${hit.rank} · score ${hit.score.toFixed(3)} · ${hit.path}${noted(hit)}` : "";
  $("detail-frames").replaceChildren();
  if (!dialog.open) dialog.showModal();
  const url = new URL(location.href);
  url.searchParams.set("item", id);
  history.replaceState(null, "", url);
  let item;
  try {
    item = await getJson("/api/item?" + new URLSearchParams({ id }));
  } catch (err) {
    $("detail-meta").textContent = `error: ${err.message}`;
    return;
  }
  if (!hit) $("detail-meta").textContent = `${item.path}${noted(item)}`;
  const frames = item.frames.map((frame) => {
    const img = el("img", { src: frameUrl(id, frame.frame), alt: `frame ${frame.frame}` });
    const picture = el("div", { class: "picture" }, img);
    for (const region of frame.regions) picture.append(box(region.box, "detected", `${region.label} ${region.score.toFixed(2)}`));
    if (hit) drawMatches(picture, hit.regions, frame.frame);
    img.addEventListener("load", () => placeTags(picture.parentElement));
    const best = hit && hit.frame === frame.frame ? " · best match" : "";
    return el("figure", {}, el("div", { class: "frame" }, picture),
      el("figcaption", {}, `frame ${frame.frame} · ${frame.time.toFixed(2)} s${best}`));
  });
  $("detail-frames").replaceChildren(...frames);
}

function closeItem() {
  const url = new URL(location.href);
  url.searchParams.delete("item");
  history.replaceState(null, "", url);
}

async function start() {
  const query = params.get("q") || "";
  const k = params.get("k") || "12";
  $("q").value = query;
  if (![...$("k").options].some((o) => o.value === k)) $("k").append(el("option", { value: k }, `${k} results`));
  $("k").value = k;
  $("detail-close").addEventListener("click", () => $("detail").close());
  $("detail").addEventListener("close", closeItem);
  const about = getJson("/api/info");
  info = about.catch(() => null); // results do not wait on it failing
  about.then((i) => { if (i.example) $("q").placeholder = i.example; }, () => {});
  if (query) {
    await search(query, k);
  } else {
    about.then((i) => setStatus(`Search ${i.items.toLocaleString()} videos by what happens in them` +
      (i.model ? ` (model: ${i.model}).` : ".") +
      (i.unindexed ? ` ${i.unindexed.toLocaleString()} more are cached but not in the index yet: run \`vlpcache index\`.` : "")),
      (err) => setStatus(`error: ${err.message}`, true));
  }
  if (params.get("item")) openItem(params.get("item"));
}

start();
