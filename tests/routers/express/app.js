// An Express 4 upstream with Express's default routing: case-insensitive, not strict about a trailing slash,
// matching the path as received and decoding each parameter after the split on '/'. Every route answers with
// the resource it serves (the route with its parameters) in X-Route-Resource; anything else is a 404.
// Prints the port it listens on as its first line of output.
'use strict';
const path = require('path');
const express = require('express');

const routes = require(path.join(__dirname, '..', 'routes.json'));
const app = express();

for (const template of routes) {
  const expressPath = template.replace(/\{(\w+)\}/g, ':$1');
  app.all(expressPath, (req, res) => {
    const resource = template.replace(/\{(\w+)\}/g, (_, name) => req.params[name]);
    res.set('X-Route-Resource', encodeURIComponent(resource));
    res.set('X-Route-Method', req.method);
    res.json({ router: 'express', resource });
  });
}
app.use((req, res) => res.status(404).json({ router: 'express', resource: null }));

const server = app.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  process.stdout.write(`${server.address().port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
