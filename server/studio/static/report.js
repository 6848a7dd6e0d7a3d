// A vector's analysis report (summary.md of `tunevec analyze`), shown in a dialog. The files sit behind the API
// key, so they are fetched with it; the Markdown is rendered by the small subset below (headings, paragraphs,
// lists, tables, code, images, emphasis), built as DOM nodes, never as HTML text.

import { getBlob, getText } from "./api.js";

function inline(parent, text, images) {
  // `code`, **bold**, *em*, ![alt](file) and [text](url) (links shown as their text)
  const pattern = /(`[^`]+`|\*\*[^*]+\*\*|\*[^*]+\*|!\[[^\]]*\]\([^)]+\)|\[[^\]]+\]\([^)]+\))/g;
  let last = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    const token = m[0];
    let node;
    if (token.startsWith("`")) {
      node = document.createElement("code");
      node.textContent = token.slice(1, -1);
    } else if (token.startsWith("**")) {
      node = document.createElement("strong");
      node.textContent = token.slice(2, -2);
    } else if (token.startsWith("![")) {
      const [, alt, src] = token.match(/^!\[([^\]]*)\]\(([^)]+)\)$/);
      node = document.createElement("img");
      node.alt = alt;
      images.push([node, src]);
    } else if (token.startsWith("[")) {
      node = document.createElement("span");
      node.textContent = token.match(/^\[([^\]]+)\]/)[1];
    } else {
      node = document.createElement("em");
      node.textContent = token.slice(1, -1);
    }
    parent.append(node);
    last = m.index + token.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function cells(line) {
  return line.replace(/^\s*\|/, "").replace(/\|\s*$/, "").split("|").map((c) => c.trim());
}

export function renderMarkdown(container, markdown) {
  const images = [];
  const lines = markdown.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    if (line.startsWith("```")) {
      const pre = document.createElement("pre");
      const body = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) body.push(lines[i]);
      pre.textContent = body.join("\n");
      container.append(pre);
      i++;
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = document.createElement(`h${Math.min(6, heading[1].length + 2)}`);
      inline(h, heading[2], images);
      container.append(h);
      i++;
      continue;
    }
    if (line.trim().startsWith("|") && i + 1 < lines.length && /^\s*\|?\s*:?-{2,}/.test(lines[i + 1])) {
      const wrap = document.createElement("div");
      wrap.className = "table-wrap";
      const table = document.createElement("table");
      const head = document.createElement("tr");
      for (const c of cells(line)) {
        const th = document.createElement("th");
        inline(th, c, images);
        head.append(th);
      }
      table.append(head);
      for (i += 2; i < lines.length && lines[i].trim().startsWith("|"); i++) {
        const tr = document.createElement("tr");
        for (const c of cells(lines[i])) {
          const td = document.createElement("td");
          inline(td, c, images);
          tr.append(td);
        }
        table.append(tr);
      }
      wrap.append(table);
      container.append(wrap);
      continue;
    }
    if (/^\s*[-*]\s+/.test(line)) {
      const ul = document.createElement("ul");
      for (; i < lines.length && /^\s*[-*]\s+/.test(lines[i]); i++) {
        const li = document.createElement("li");
        inline(li, lines[i].replace(/^\s*[-*]\s+/, ""), images);
        ul.append(li);
      }
      container.append(ul);
      continue;
    }
    const p = document.createElement("p");
    const body = [];
    for (; i < lines.length && lines[i].trim() && !/^(#|\||```|\s*[-*]\s)/.test(lines[i]); i++) body.push(lines[i]);
    inline(p, body.join(" "), images);
    container.append(p);
  }
  return images;
}

export async function openReport(dialog, body, title, vector, report) {
  title.textContent = `Analysis report: ${vector}`;
  body.replaceChildren();
  const status = document.createElement("p");
  status.textContent = "loading…";
  body.append(status);
  dialog.showModal();
  const base = `/v1/tunevec/studio/reports/${report.id}/`;
  try {
    const markdown = await getText(base + "summary.md");
    status.remove();
    const meta = document.createElement("p");
    meta.className = "report-meta";
    meta.textContent = `created ${report.created || "?"} · files: ${report.files.join(", ")}`;
    body.append(meta);
    const images = renderMarkdown(body, markdown);
    for (const [img, src] of images) {
      if (!report.files.includes(src)) continue;
      getBlob(base + src)
        .then((blob) => {
          img.src = URL.createObjectURL(blob);
        })
        .catch((err) => {
          img.alt = `${img.alt} (not loaded: ${err.message})`;
        });
    }
  } catch (err) {
    status.textContent = `The report could not be loaded: ${err.message}`;
    status.setAttribute("role", "alert");
  }
}
