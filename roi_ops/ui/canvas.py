"""The box canvas of ``roi-ops ui``: a ``gr.HTML`` component with its own HTML, CSS and JavaScript.

Its value is the canvas value of :mod:`roi_ops.ui.layouts` (``{"width", "height", "instances": [{"box": normalised
xyxy, "caption"}]}``). In the page: drag on an empty spot to draw a box, drag a box to move it, drag one of its
corner handles to resize it, type its caption in the list below, and delete it with its x button (or the Delete
key while it is selected). Every edit writes the whole value back (``props.value``), which is what the Python
side reads; a value sent by Python (a layout import) redraws the canvas (``watch``). The area has the image's
aspect ratio and is shown at least :data:`~roi_ops.ui.engine.DISPLAY_SIDE` pixels wide, with a faint grid of the
image's pixels when it has at most 64 a side, so a 32 x 32 toy image is drawn for as a usable canvas.

Mask hook (the mask issue): a per-box brush or mask upload goes in the list row of a box (``row`` in
``renderList``), keeping the mask in the instance object (``read`` keeps an instance's other keys), which
:mod:`roi_ops.ui.layouts` then checks and exports.
"""

from __future__ import annotations

from roi_ops.roictrl_adapter.generate import BOX_COLORS

from .engine import DISPLAY_SIDE

HTML_TEMPLATE = """
<div class="roi-ui">
  <div class="roi-canvas" tabindex="0" data-testid="roi-canvas"></div>
  <div class="roi-bar">
    <span class="roi-size"></span>
    <button type="button" class="roi-clear">Delete all boxes</button>
  </div>
  <p class="roi-hint">Drag on the canvas to draw a box. Drag a box to move it, a corner to resize it; type its
  caption below; x or the Delete key removes the selected box.</p>
  <ol class="roi-list" start="0"></ol>
</div>
"""

CSS_TEMPLATE = """
.roi-ui { display: flex; flex-direction: column; gap: 6px; }
.roi-canvas { position: relative; width: 100%; max-width: 640px; min-width: @DISPLAY_SIDE@px; background-color: #26262b;
  border: 1px solid #777; cursor: crosshair; user-select: none; touch-action: none; outline: none; }
.roi-canvas:focus { border-color: #4da3ff; }
.roi-box { position: absolute; box-sizing: border-box; border: 3px solid; cursor: move; }
.roi-box.selected { box-shadow: 0 0 0 2px #fff; }
.roi-label { position: absolute; left: -3px; top: -22px; padding: 1px 5px; font: 12px/18px sans-serif; color: #fff;
  white-space: nowrap; max-width: 280px; overflow: hidden; text-overflow: ellipsis; pointer-events: none; }
.roi-handle { position: absolute; width: 12px; height: 12px; background: #fff; border: 1px solid #000;
  box-sizing: border-box; }
.roi-handle[data-corner="nw"] { left: -8px; top: -8px; cursor: nwse-resize; }
.roi-handle[data-corner="ne"] { right: -8px; top: -8px; cursor: nesw-resize; }
.roi-handle[data-corner="sw"] { left: -8px; bottom: -8px; cursor: nesw-resize; }
.roi-handle[data-corner="se"] { right: -8px; bottom: -8px; cursor: nwse-resize; }
.roi-bar { display: flex; justify-content: space-between; align-items: center; font-size: 13px; }
.roi-hint { font-size: 12px; opacity: 0.75; margin: 0; }
.roi-list { margin: 0; padding-left: 0; list-style: none; display: flex; flex-direction: column; gap: 4px; }
.roi-row { display: flex; align-items: center; gap: 6px; }
.roi-row.selected .roi-caption { outline: 2px solid #4da3ff; }
.roi-swatch { width: 14px; height: 14px; border-radius: 2px; flex: none; }
.roi-index { font: 12px monospace; width: 22px; flex: none; }
.roi-caption { flex: 1; padding: 3px 6px; font-size: 14px; }
.roi-delete, .roi-clear { padding: 2px 8px; cursor: pointer; font: 13px sans-serif; border: 1px solid #888;
  border-radius: 4px; }
""".replace("@DISPLAY_SIDE@", str(DISPLAY_SIDE))

JS_ON_LOAD = r"""
const colors = props.colors || ['#e6194b'];
const MIN_SIDE = 0.02;  // a box narrower than this (of the image) is a click, not a box
const DIGITS = 1e4;     // layouts.BOX_DIGITS
let state = read(props.value);
let selected = -1;
let drag = null;        // {mode: 'draw'|'move'|'resize', ...} while the mouse button is down

function q(sel) { return element.querySelector(sel); }
function clamp(v, lo, hi) { return Math.min(hi, Math.max(lo, v)); }
function round(v) { return Math.round(v * DIGITS) / DIGITS; }

function read(v) {
  if (typeof v === 'string') { try { v = JSON.parse(v); } catch (e) { v = null; } }
  const ok = v && typeof v === 'object';
  const side = (x) => (Number.isInteger(x) && x > 0 ? x : 512);
  const items = ok && Array.isArray(v.instances) ? v.instances : [];
  return {
    width: side(ok ? v.width : 0), height: side(ok ? v.height : 0),
    instances: items.map((it) => ({
      ...(it && typeof it === 'object' ? it : {}),  // other keys (the mask issue's mask) go through unchanged
      box: Array.isArray(it && it.box) && it.box.length === 4 ? it.box.map(Number) : [0, 0, 0, 0],
      caption: it && typeof it.caption === 'string' ? it.caption : '',
    })),
  };
}

// Write the whole value back: what the Python side reads on Generate / Export.
function commit() {
  props.value = JSON.parse(JSON.stringify(state));
  trigger('change');
}

function point(ev) {
  const r = q('.roi-canvas').getBoundingClientRect();
  return [clamp((ev.clientX - r.left) / r.width, 0, 1), clamp((ev.clientY - r.top) / r.height, 0, 1)];
}

function place(div, box) {
  const [x1, y1, x2, y2] = box;
  div.style.left = (100 * Math.min(x1, x2)) + '%';
  div.style.top = (100 * Math.min(y1, y2)) + '%';
  div.style.width = (100 * Math.abs(x2 - x1)) + '%';
  div.style.height = (100 * Math.abs(y2 - y1)) + '%';
}

function render() {
  const canvas = q('.roi-canvas');
  canvas.style.aspectRatio = state.width + ' / ' + state.height;
  const grid = Math.max(state.width, state.height) <= 64;
  canvas.style.backgroundImage = grid
    ? 'linear-gradient(to right, rgba(255,255,255,0.07) 1px, transparent 1px),' +
      'linear-gradient(to bottom, rgba(255,255,255,0.07) 1px, transparent 1px)' : 'none';
  canvas.style.backgroundSize = (100 / state.width) + '% ' + (100 / state.height) + '%';
  q('.roi-size').textContent = 'image ' + state.width + ' x ' + state.height + ' px, ' +
    state.instances.length + (state.instances.length === 1 ? ' box' : ' boxes');
  canvas.querySelectorAll('.roi-box').forEach((b) => b.remove());
  state.instances.forEach((inst, k) => {
    const color = colors[k % colors.length];
    const div = document.createElement('div');
    div.className = 'roi-box' + (k === selected ? ' selected' : '');
    div.dataset.index = k;
    div.style.borderColor = color;
    place(div, inst.box);
    const label = document.createElement('span');
    label.className = 'roi-label';
    label.style.background = color;
    label.textContent = k + ': ' + (inst.caption || '(no caption)');
    div.appendChild(label);
    for (const corner of ['nw', 'ne', 'sw', 'se']) {
      const h = document.createElement('div');
      h.className = 'roi-handle';
      h.dataset.corner = corner;
      div.appendChild(h);
    }
    canvas.appendChild(div);
  });
  renderList();
}

// The caption list; the focused caption keeps its focus and caret across a redraw.
function renderList() {
  const list = q('.roi-list');
  const active = document.activeElement;
  const focusIndex = active && active.classList && active.classList.contains('roi-caption')
    ? Number(active.dataset.index) : -1;
  const caret = focusIndex >= 0 ? [active.selectionStart, active.selectionEnd] : null;
  list.replaceChildren();
  state.instances.forEach((inst, k) => {
    const row = document.createElement('li');
    row.className = 'roi-row' + (k === selected ? ' selected' : '');
    const swatch = document.createElement('span');
    swatch.className = 'roi-swatch';
    swatch.style.background = colors[k % colors.length];
    const index = document.createElement('span');
    index.className = 'roi-index';
    index.textContent = k;
    const input = document.createElement('input');
    input.className = 'roi-caption';
    input.type = 'text';
    input.placeholder = 'caption of box ' + k + ', e.g. a red square';
    input.value = inst.caption;
    input.dataset.index = k;
    input.addEventListener('focus', () => { if (selected !== k) { selected = k; highlight(); } });
    input.addEventListener('input', () => {
      state.instances[k].caption = input.value;
      const label = q('.roi-box[data-index="' + k + '"] .roi-label');
      if (label) label.textContent = k + ': ' + (input.value || '(no caption)');
      commit();
    });
    const del = document.createElement('button');
    del.type = 'button';
    del.className = 'roi-delete';
    del.title = 'delete box ' + k;
    del.textContent = 'x';
    del.addEventListener('click', () => remove(k));
    row.append(swatch, index, input, del);  // mask hook: a brush / mask upload per box goes here
    list.appendChild(row);
  });
  if (focusIndex >= 0 && focusIndex < state.instances.length) {
    const input = list.querySelector('.roi-caption[data-index="' + focusIndex + '"]');
    input.focus();
    input.setSelectionRange(caret[0], caret[1]);
  }
}

// Selection changes only restyle (no redraw, so a caption being typed keeps its focus).
function highlight() {
  element.querySelectorAll('.roi-box').forEach((b) => b.classList.toggle('selected', Number(b.dataset.index) === selected));
  element.querySelectorAll('.roi-row').forEach((r, k) => r.classList.toggle('selected', k === selected));
}

function remove(k) {
  state.instances.splice(k, 1);
  selected = -1;
  render();
  commit();
}

function onDown(ev) {
  if (ev.button !== 0) return;
  const canvas = q('.roi-canvas');
  const [x, y] = point(ev);
  const handle = ev.target.closest('.roi-handle');
  const boxDiv = ev.target.closest('.roi-box');
  if (handle && boxDiv) {
    const k = Number(boxDiv.dataset.index);
    const [x1, y1, x2, y2] = state.instances[k].box;
    const c = handle.dataset.corner;
    // the corner opposite the dragged one stays fixed
    drag = { mode: 'resize', k, fixed: [c.includes('w') ? x2 : x1, c.includes('n') ? y2 : y1] };
    selected = k;
  } else if (boxDiv) {
    const k = Number(boxDiv.dataset.index);
    drag = { mode: 'move', k, start: [x, y], box: state.instances[k].box.slice() };
    selected = k;
  } else {
    const div = document.createElement('div');
    div.className = 'roi-box roi-drawing';
    div.style.borderColor = colors[state.instances.length % colors.length];
    canvas.appendChild(div);
    drag = { mode: 'draw', start: [x, y], div };
    selected = -1;
  }
  highlight();
  canvas.focus();
  canvas.setPointerCapture(ev.pointerId);
  ev.preventDefault();
}

function boxDuring(d, ev) {
  const [x, y] = point(ev);
  if (d.mode === 'draw') return [d.start[0], d.start[1], x, y];
  if (d.mode === 'resize') return [d.fixed[0], d.fixed[1], x, y];
  const [x1, y1, x2, y2] = d.box;
  const dx = clamp(x - d.start[0], -x1, 1 - x2);
  const dy = clamp(y - d.start[1], -y1, 1 - y2);
  return [x1 + dx, y1 + dy, x2 + dx, y2 + dy];
}

function ordered(b) {
  return [round(Math.min(b[0], b[2])), round(Math.min(b[1], b[3])), round(Math.max(b[0], b[2])),
          round(Math.max(b[1], b[3]))];
}

function onMove(ev) {
  if (!drag) return;
  const box = boxDuring(drag, ev);
  const div = drag.mode === 'draw' ? drag.div : q('.roi-box[data-index="' + drag.k + '"]');
  if (div) place(div, box);
}

function onUp(ev) {
  if (!drag) return;
  const d = drag;
  drag = null;
  const box = ordered(boxDuring(d, ev));
  const big = box[2] - box[0] >= MIN_SIDE && box[3] - box[1] >= MIN_SIDE;
  if (d.mode === 'draw') {
    d.div.remove();
    if (!big) return;
    state.instances.push({ box, caption: '' });
    selected = state.instances.length - 1;
    render();
    commit();
    q('.roi-caption[data-index="' + selected + '"]').focus();
  } else {
    if (d.mode === 'resize' && !big) { render(); return; }  // too small: the resize is undone
    if (d.mode === 'move' && box.every((v, i) => v === round(d.box[i]))) { render(); return; }  // a click
    state.instances[d.k].box = box;
    render();
    commit();
  }
}

function onKey(ev) {
  if ((ev.key === 'Delete' || ev.key === 'Backspace') && selected >= 0) {
    remove(selected);
    ev.preventDefault();
  }
}

const canvas = q('.roi-canvas');
canvas.addEventListener('pointerdown', onDown);
canvas.addEventListener('pointermove', onMove);
canvas.addEventListener('pointerup', onUp);
canvas.addEventListener('pointercancel', () => { drag = null; render(); });
canvas.addEventListener('keydown', onKey);
q('.roi-clear').addEventListener('click', () => { state.instances = []; selected = -1; render(); commit(); });
// A value sent by Python (a layout import) replaces the canvas.
watch('value', () => { state = read(props.value); selected = -1; render(); });
render();
"""


def hex_colors() -> list[str]:
    """:data:`~roi_ops.roictrl_adapter.generate.BOX_COLORS` as CSS colours: box ``k`` has the colour it has in
    the boxes overlay and in ``roi-ops generate``'s ``.boxes.png``."""
    return ["#%02x%02x%02x" % tuple(c) for c in BOX_COLORS]


def box_canvas(value: dict, **kwargs):
    """The canvas component (``gr.HTML``) holding ``value``; ``kwargs`` go to ``gr.HTML``."""
    import gradio as gr

    return gr.HTML(value=value, html_template=HTML_TEMPLATE, css_template=CSS_TEMPLATE, js_on_load=JS_ON_LOAD,
                   colors=hex_colors(), **kwargs)
