// Validates Gateway API objects (JSON array on stdin) against the Gateway API CRD schemas shipped in npm
// @kubernetes-models/gateway-api; prints one JSON array: per object, [] when valid, else the schema's complaints.
import { readFileSync } from "node:fs";
import * as v1 from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";

const objects = JSON.parse(readFileSync(0, "utf8"));
const results = objects.map((object) => {
  const model = v1[object.kind];
  if (object.apiVersion !== "gateway.networking.k8s.io/v1" || typeof model !== "function") {
    return [`no schema for ${object.apiVersion} ${object.kind}`];
  }
  try {
    new model(object).validate();
    return [];
  } catch (error) {
    return String(error.message).split(", ");
  }
});
process.stdout.write(JSON.stringify(results));
