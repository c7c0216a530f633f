"""The style and the script of ``report.html`` (:mod:`kad.screening.report`).

The script draws the worklist's rows and the image cards from the records in
``<script id="records">`` (one per image), in the order and filter the reader picks: the
first rows and cards at once, the others as they scroll into view; the cards' pictures
load lazily.
"""

from kad.screening._report_images import THUMB

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#222;
 max-width:1600px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555;font-size:13px}table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.num{font-variant-numeric:tabular-nums}.note{color:#8a4b00}
.shift{border-left:4px solid #D55E00;padding:6px 10px;background:#fff4ec}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plots img{max-width:100%;height:auto}
.controls{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:8px 0;font-size:13px}
.worklist{max-height:60vh;overflow:auto;border:1px solid #ddd;max-width:100%}
.worklist table{width:100%;min-width:720px;table-layout:fixed}
.worklist td{overflow-wrap:anywhere}.worklist col.narrow{width:5.5em}.worklist col.value{width:7em}
.worklist thead th{position:sticky;top:0;background:#f4f4f4}
.worklist th button{font:inherit;font-weight:bold;border:0;background:none;padding:0;
 cursor:pointer}
.worklist th[aria-sort=ascending] button::after{content:" ▲"}
.worklist th[aria-sort=descending] button::after{content:" ▼"}
tr.flag td:first-child{box-shadow:inset 4px 0 #d33}
.cards{display:grid;gap:14px;
 grid-template-columns:repeat(auto-fill,minmax(min(100%,var(--card)),1fr))}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;min-width:0}
.card.flag{border:2px solid #d33}
.card h3{font-size:13px;margin:0 0 6px;overflow-wrap:anywhere;font-weight:600}
.card h3 a{color:inherit}
.panels{display:grid;gap:6px;grid-template-columns:repeat(var(--panels),minmax(0,1fr))}
.panels figure{margin:0;min-width:0}
.panels img{display:block;width:100%;height:auto;aspect-ratio:1/1;object-fit:contain;
 background:#111;border-radius:3px}
.panels figcaption{font-size:11px;color:#555;text-align:center;overflow-wrap:anywhere;
 margin-top:2px}
.card p{font-size:12px;margin:6px 0 0;overflow-wrap:anywhere}
.colourbar{display:flex;align-items:center;gap:8px;font-size:12px;flex-wrap:wrap}
.colourbar .bar{width:240px;max-width:60vw;height:14px;border:1px solid #999}
#more{margin:12px 0;font:inherit}#more-rows{margin:6px;font:inherit}
[hidden]{display:none!important}
"""

SCRIPT = """
(function(){
 const DATA=JSON.parse(document.getElementById('records').textContent);
 const table=document.getElementById('worklist'), body=table.tBodies[0];
 const cards=document.getElementById('cards'), q=document.getElementById('search');
 const only=document.getElementById('flagged-only'), count=document.getElementById('shown');
 const more=document.getElementById('more'), moreRows=document.getElementById('more-rows');
 const FOLDER=cards.dataset.folder, HEAT=table.dataset.heat==='1', CHUNK=60, ROWS=200;
 const PICS={t:'as taken',m:'model input',h:'heatmap as the model saw it',
  p:'heatmap on the photograph'};
 let key='rank', dir=1, order=DATA, drawn=0, rowsDrawn=0;
 const value={rank:d=>d.i, score:d=>d.score, name:d=>d.name, p:d=>d.p===null?Infinity:d.p};
 function el(tag, cls, text){const e=document.createElement(tag); if(cls) e.className=cls;
  if(text!==undefined) e.textContent=text; return e;}
 function row(d){
  const tr=el('tr', d.flag?'flag':''); tr.id='row-'+d.i;
  Object.assign(tr.dataset,{i:d.i, score:d.score, p:d.p===null?'':d.p, flag:d.flag,
   name:d.name});
  const link=el('a','',d.name); link.href='#img-'+d.i; link.title=d.file;
  const name=el('td'); name.append(link);
  tr.append(el('td','num',d.i+1), name, el('td','num',d.cells[0]), el('td','num',d.cells[1]),
   el('td','',d.cells[2]), el('td','',d.cells[3]));
  if(HEAT) tr.append(el('td','num',d.cells[4]));
  return tr;}
 function card(d){
  const a=el('article','card'+(d.flag?' flag':'')), tags=d.pics.split('');
  a.id='img-'+d.i; a.dataset.i=d.i; a.style.setProperty('--panels',Math.max(tags.length,1));
  const h=el('h3'), link=el('a','',d.name); link.href='#row-'+d.i; link.title=d.file;
  h.append(link);
  const panels=el('div','panels');
  for(const t of tags){
   const f=el('figure'), img=el('img');
   img.loading='lazy'; img.decoding='async'; img.width=img.height=THUMB;
   img.alt=d.name+': '+PICS[t]; img.src=FOLDER+'/'+String(d.i).padStart(5,'0')+t+'.jpg';
   f.append(img, el('figcaption','',PICS[t])); panels.append(f);}
  if(!tags.length) panels.append(el('p','','(the file could not be read again)'));
  a.append(h, panels, el('p','',d.caption)); return a;}
 function drawRows(upto){
  const part=document.createDocumentFragment();
  for(; rowsDrawn<Math.min(upto,order.length); rowsDrawn++) part.append(row(order[rowsDrawn]));
  body.append(part); moreRows.hidden=rowsDrawn>=order.length;}
 function draw(upto){
  const part=document.createDocumentFragment();
  for(; drawn<Math.min(upto,order.length); drawn++) part.append(card(order[drawn]));
  cards.append(part); more.hidden=drawn>=order.length;
  more.textContent='show '+Math.min(CHUNK,order.length-drawn)+' more of '+
   (order.length-drawn);}
 function apply(){
  const text=q.value.trim().toLowerCase(), flagged=only.checked, get=value[key];
  order=DATA.filter(d=>(!flagged||d.flag)&&(!text||d.name.toLowerCase().includes(text)));
  order.sort((a,b)=>{const x=get(a),y=get(b);
   const c=typeof x==='string'?x.localeCompare(y):x-y; return c*dir||a.i-b.i;});
  count.textContent=order.length+' of '+DATA.length+' images shown';
  for(const th of table.querySelectorAll('th[data-key]'))
   th.setAttribute('aria-sort',th.dataset.key===key?(dir>0?'ascending':'descending'):'none');
  body.replaceChildren(); rowsDrawn=0; drawRows(ROWS);
  cards.replaceChildren(); drawn=0; draw(CHUNK);
 }
 function reach(i, rows){
  const at=order.findIndex(d=>d.i===i); if(at<0) return false;
  if(rows){if(at>=rowsDrawn) drawRows(at+1);} else if(at>=drawn) draw(at+1);
  return true;}
 for(const th of table.querySelectorAll('th[data-key]'))
  th.querySelector('button').addEventListener('click',()=>{
   const k=th.dataset.key; dir=k===key?-dir:(k==='score'?-1:1); key=k; apply();});
 q.addEventListener('input',apply); only.addEventListener('change',apply);
 more.addEventListener('click',()=>draw(drawn+CHUNK));
 moreRows.addEventListener('click',()=>drawRows(rowsDrawn+ROWS));
 new IntersectionObserver(e=>{if(e[0].isIntersecting&&drawn<order.length) draw(drawn+CHUNK);},
  {rootMargin:'800px'}).observe(more);
 new IntersectionObserver(e=>{if(e[0].isIntersecting) drawRows(rowsDrawn+ROWS);},
  {root:moreRows.parentElement, rootMargin:'400px'}).observe(moreRows);
 document.addEventListener('click',e=>{
  const a=e.target.closest('a[href^="#img-"],a[href^="#row-"]'); if(!a) return;
  const target=a.getAttribute('href').slice(1), i=+target.split('-')[1];
  if(!reach(i, target.startsWith('row-'))) return;
  e.preventDefault(); location.hash=target;});
 drawRows(ROWS); draw(CHUNK);
})();
""".replace("THUMB", str(THUMB))
